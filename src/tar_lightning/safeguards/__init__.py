"""The safeguard training modules: stage-1 safeguards (TAR's starting checkpoints) and plain LM teaching."""

from tar_lightning.safeguards.knowledge_lm import KnowledgeLMModule
from tar_lightning.safeguards.random_mapping import RandomMappingModule

__all__ = ["KnowledgeLMModule", "RandomMappingModule"]
