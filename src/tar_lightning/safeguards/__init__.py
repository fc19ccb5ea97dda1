"""Stage-1 safeguards (TAR's starting checkpoints)."""

from tar_lightning.safeguards.random_mapping import RandomMappingModule

__all__ = ["RandomMappingModule"]
