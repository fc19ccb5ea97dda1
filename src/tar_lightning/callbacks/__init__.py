"""Callbacks: they observe and control training, never change gradients."""

from tar_lightning.callbacks.retain_monitor import RetainLossMonitor

__all__ = ["RetainLossMonitor"]
