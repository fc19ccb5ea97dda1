"""Adversaries (fine-tuning, activation perturbations, refusal ablation): their configuration, optimizers/schedules,
and the runner that applies one."""

from tar_lightning.adversaries.config import (
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
    AdversaryConfig,
    EmbeddingAttackConfig,
    LatentAttackConfig,
    LoRAConfig,
    RefusalAblationConfig,
    SwitchConfig,
    sample_adversary,
)
from tar_lightning.adversaries.optim import build_adversary_optimizer, build_optimizer, build_scheduler
from tar_lightning.adversaries.runner import AdversaryRun

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "AdversaryConfig",
    "AdversaryRun",
    "EmbeddingAttackConfig",
    "LatentAttackConfig",
    "LoRAConfig",
    "RefusalAblationConfig",
    "SwitchConfig",
    "build_adversary_optimizer",
    "build_optimizer",
    "build_scheduler",
    "sample_adversary",
]
