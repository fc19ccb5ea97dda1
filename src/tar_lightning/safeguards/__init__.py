"""The safeguard training modules: stage-1 safeguards (TAR's starting checkpoints; random mapping and the RMU
baseline) and plain LM teaching."""

from tar_lightning.safeguards.knowledge_lm import KnowledgeLMModule
from tar_lightning.safeguards.random_mapping import RandomMappingModule
from tar_lightning.safeguards.rmu import RMUModule

__all__ = ["KnowledgeLMModule", "RMUModule", "RandomMappingModule"]
