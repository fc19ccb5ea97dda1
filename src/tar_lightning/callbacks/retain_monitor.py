"""Watching the capability cost of a safeguard while it trains."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from tar_lightning.errors import ConfigError

__all__ = ["RetainLossMonitor"]


class RetainLossMonitor(L.Callback):
    """Tracks the retain loss relative to its value at the start of training.

    The baseline is the mean of the first ``baseline_steps`` logged values; after that, an exponential moving
    average of the loss is compared with it and ``<prefix>/ratio`` (EMA / baseline) is logged every step. Past
    ``warn_ratio`` a warning is issued (once per crossing); past ``stop_ratio`` (when set) training stops at the
    end of that step with a message saying why.

    Args:
        metric: the logged metric to watch.
        baseline_steps: how many first values form the baseline.
        ema_decay: smoothing of the watched value, in [0, 1).
        warn_ratio: warn when EMA / baseline exceeds this.
        stop_ratio: stop training when EMA / baseline exceeds this (``None``: never stop).
        prefix: namespace of the logged metrics.

    Raises:
        ConfigError: invalid arguments.
    """

    def __init__(
        self,
        metric: str = "train/retain_loss",
        baseline_steps: int = 5,
        ema_decay: float = 0.9,
        warn_ratio: float = 1.5,
        stop_ratio: Optional[float] = None,
        prefix: str = "retain_monitor",
    ) -> None:
        if baseline_steps < 1:
            raise ConfigError(f"RetainLossMonitor.baseline_steps={baseline_steps}: expected >= 1")
        if not 0 <= ema_decay < 1:
            raise ConfigError(f"RetainLossMonitor.ema_decay={ema_decay}: expected a value in [0, 1)")
        if not warn_ratio > 0:
            raise ConfigError(f"RetainLossMonitor.warn_ratio={warn_ratio}: expected > 0")
        if stop_ratio is not None and not stop_ratio > 0:
            raise ConfigError(f"RetainLossMonitor.stop_ratio={stop_ratio}: expected > 0 or null")
        self.metric = metric
        self.baseline_steps = baseline_steps
        self.ema_decay = ema_decay
        self.warn_ratio = warn_ratio
        self.stop_ratio = stop_ratio
        self.prefix = prefix
        self.baseline_values: list[float] = []
        self.ema: Optional[float] = None
        self.warned = False
        self.stop_reason: Optional[str] = None

    @property
    def baseline(self) -> Optional[float]:
        if len(self.baseline_values) < self.baseline_steps:
            return None
        return sum(self.baseline_values) / len(self.baseline_values)

    @property
    def ratio(self) -> Optional[float]:
        base = self.baseline
        if base is None or self.ema is None or base <= 0:
            return None
        return self.ema / base

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            if trainer.global_step <= 1:
                rank_zero_warn(
                    f"RetainLossMonitor: metric {self.metric!r} is not logged; logged metrics are "
                    f"{sorted(trainer.callback_metrics)}"
                )
            return
        value = float(value)
        if not math.isfinite(value):
            return
        if len(self.baseline_values) < self.baseline_steps:
            self.baseline_values.append(value)
        self.ema = value if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * value
        ratio = self.ratio
        if ratio is None:
            return
        pl_module.log(f"{self.prefix}/ratio", ratio, on_step=True, on_epoch=False)
        pl_module.log(f"{self.prefix}/baseline", self.baseline, on_step=True, on_epoch=False)
        if ratio > self.warn_ratio and not self.warned:
            rank_zero_warn(
                f"RetainLossMonitor: {self.metric} is {ratio:.2f}x its starting value {self.baseline:.4f} "
                f"(warn_ratio={self.warn_ratio}) at step {trainer.global_step}: the safeguard is costing capability"
            )
            self.warned = True
        elif ratio <= self.warn_ratio:
            self.warned = False
        if self.stop_ratio is not None and ratio > self.stop_ratio:
            self.stop_reason = (
                f"RetainLossMonitor stopped training at step {trainer.global_step}: {self.metric} (EMA {self.ema:.4f}) "
                f"is {ratio:.2f}x its starting value {self.baseline:.4f}, above stop_ratio={self.stop_ratio}"
            )
            rank_zero_warn(self.stop_reason)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_values": list(self.baseline_values),
            "ema": self.ema,
            "warned": self.warned,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline_values = list(state_dict["baseline_values"])
        self.ema = state_dict["ema"]
        self.warned = state_dict["warned"]
        self.stop_reason = state_dict["stop_reason"]
