"""tar_lightning: tamper-resistant safeguards (TAR) for open-weight LLMs, as Lightning modules and recipes."""

from tar_lightning.adversaries import AdversaryConfig, AdversaryRun, LoRAConfig, SwitchConfig
from tar_lightning.callbacks import RetainLossMonitor, TamperProbe
from tar_lightning.data import DataSource, TARDataModule
from tar_lightning.errors import ConfigError, DataError, ModelLoadError, TARLightningError
from tar_lightning.evaluation import load_suite, run_redteam
from tar_lightning.models import ModelSource, load_model, tiny_llama, tiny_model
from tar_lightning.safeguards import RandomMappingModule, RMUModule, SFTModule, UnlearnModule
from tar_lightning.tar_config import TARConfig
from tar_lightning.tar_module import TARModule

__version__ = "0.1.0"

__all__ = [
    "AdversaryConfig",
    "AdversaryRun",
    "ConfigError",
    "DataError",
    "DataSource",
    "LoRAConfig",
    "ModelLoadError",
    "ModelSource",
    "RandomMappingModule",
    "RMUModule",
    "RetainLossMonitor",
    "SFTModule",
    "SwitchConfig",
    "TamperProbe",
    "TARConfig",
    "TARDataModule",
    "TARLightningError",
    "TARModule",
    "UnlearnModule",
    "load_model",
    "load_suite",
    "run_redteam",
    "tiny_llama",
    "tiny_model",
]
