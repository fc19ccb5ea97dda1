"""Fine-tuning adversaries: their configuration, optimizers/schedules, and the runner that applies one."""

from tar_lightning.adversaries.config import (
    OPTIMIZERS,
    SCHEDULES,
    AdversaryConfig,
    LoRAConfig,
    SwitchConfig,
    sample_adversary,
)
from tar_lightning.adversaries.optim import build_adversary_optimizer, build_optimizer, build_scheduler
from tar_lightning.adversaries.runner import AdversaryRun

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "AdversaryConfig",
    "AdversaryRun",
    "LoRAConfig",
    "SwitchConfig",
    "build_adversary_optimizer",
    "build_optimizer",
    "build_scheduler",
    "sample_adversary",
]
