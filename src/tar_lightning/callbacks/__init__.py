"""Callbacks: they observe and control training, never change gradients."""

from tar_lightning.callbacks.mcq_validation import MCQValidation
from tar_lightning.callbacks.retain_monitor import RetainLossMonitor
from tar_lightning.callbacks.slurm import SlurmRequeue
from tar_lightning.callbacks.tamper_probe import TamperProbe

__all__ = ["MCQValidation", "RetainLossMonitor", "SlurmRequeue", "TamperProbe"]
