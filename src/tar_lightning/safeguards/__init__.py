"""The safeguard training modules: stage-1 safeguards (TAR's starting checkpoints; random mapping and the RMU
baseline), plain LM teaching and multi-stream supervised fine-tuning."""

from tar_lightning.safeguards.knowledge_lm import KnowledgeLMModule
from tar_lightning.safeguards.random_mapping import RandomMappingModule
from tar_lightning.safeguards.rmu import RMUModule
from tar_lightning.safeguards.sft import SFTModule

__all__ = ["KnowledgeLMModule", "RMUModule", "RandomMappingModule", "SFTModule"]
