"""The safeguard training modules: stage-1 safeguards (TAR's starting checkpoints; random mapping, and the RMU,
Max-Entropy and Min-Posterior baselines) and multi-stream supervised fine-tuning (the demo's teaching stage,
refusal SFT, benign SFT)."""

from tar_lightning.safeguards.random_mapping import RandomMappingModule
from tar_lightning.safeguards.rmu import RMUModule
from tar_lightning.safeguards.sft import SFTModule
from tar_lightning.safeguards.unlearn import UnlearnModule

__all__ = ["RMUModule", "RandomMappingModule", "SFTModule", "UnlearnModule"]
