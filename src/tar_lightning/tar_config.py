"""Hyperparameters of TAR's adversarial meta-training (stage 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.errors import ConfigError

__all__ = ["TARConfig"]

TR_LOSSES = ("max_entropy", "neg_ce", "dpo")
WEIGHTINGS = ("uniform", "exponential")
ENTROPY_POSITIONS = ("attention", "labels", "all")


@dataclass
class TARConfig:
    """One TAR outer step: T trajectories of K adversary steps, TR loss every ``tr_every`` steps, then retain.

    Attributes:
        inner_steps: K, adversary steps per trajectory (paper: 64).
        tr_every: evaluate the tamper-resistance loss after every ``tr_every``-th adversary step (paper: 4).
        trajectories: T, adversary trajectories per outer step (paper: 1).
        tr_loss: ``max_entropy`` (paper, weaponization), ``neg_ce`` (ablation), ``dpo`` (refusal).
        entropy_positions: which predictive distributions the entropy is taken over: ``attention`` (every
            non-padding position), ``labels`` (positions whose next token is labelled, e.g. a fact's answer),
            ``all`` (padding included, as the reference code did).
        tr_weight: λ_TR (paper: 4).
        retain_weight: λ_retain (paper: 1).
        weighting: ``exponential`` (w_k = exp(rate·(k − (K−1))), later attacks count more) or ``uniform``.
        weighting_rate: the exponential rate (paper: 0.0625).
        normalize_weights: divide the weights by their sum (the paper does not).
        retain_representation: add the distance of hidden states to a frozen reference model to the retain loss.
        representation_weight: weight of that distance.
        representation_squared: squared L2 (the paper's formula) instead of unsquared (the reference code's).
        adversaries: the train-time adversary family; one is sampled per trajectory by ``probability``.
        clip_grad_norm: clip the outer gradient to this global 2-norm (``None``: no clipping).
        snapshot_device: where the weight snapshot lives (``None``: with the weights; ``"cpu"``: host memory).
        seed: seeds every random choice of an outer step (adversary, LR, switch point) as a function of
            (seed, outer step, trajectory), so all ranks agree without communication and resume reproduces it.
        tr_stream: name of the held-out forget stream.
        retain_stream: name of the retain stream.
        dpo_beta: β of the DPO tamper-resistance loss.
        max_nonfinite_in_a_row: an outer step whose losses or outer gradient are NaN/Inf is skipped (weights
            restored, no optimizer step); after this many skipped steps in a row training stops with an error.
    """

    inner_steps: int = 64
    tr_every: int = 4
    trajectories: int = 1
    tr_loss: Literal["max_entropy", "neg_ce", "dpo"] = "max_entropy"
    entropy_positions: Literal["attention", "labels", "all"] = "attention"
    tr_weight: float = 4.0
    retain_weight: float = 1.0
    weighting: Literal["uniform", "exponential"] = "exponential"
    weighting_rate: float = 0.0625
    normalize_weights: bool = False
    retain_representation: bool = False
    representation_weight: float = 1.0
    representation_squared: bool = False
    adversaries: list[AdversaryConfig] = field(default_factory=lambda: [AdversaryConfig()])
    clip_grad_norm: Optional[float] = None
    snapshot_device: Optional[str] = None
    seed: int = 0
    tr_stream: str = "tr"
    retain_stream: str = "retain"
    dpo_beta: float = 0.1
    max_nonfinite_in_a_row: int = 5

    def validate(self) -> TARConfig:
        """Check every field and every adversary; returns self.

        Raises:
            ConfigError: naming the field, its value and what was expected.
        """

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"TARConfig.{key}={getattr(self, key)!r}: {msg}")

        for key in ("inner_steps", "tr_every", "trajectories"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "expected a positive integer")
        if self.tr_every > self.inner_steps:
            raise bad(
                "tr_every",
                f"must be <= inner_steps={self.inner_steps}, otherwise the tamper-resistance loss is never evaluated",
            )
        if self.tr_loss not in TR_LOSSES:
            raise bad("tr_loss", f"expected one of {list(TR_LOSSES)}")
        if self.tr_loss == "dpo":
            raise bad("tr_loss", "the DPO tamper-resistance loss needs preference data, which is not supported yet")
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"expected one of {list(WEIGHTINGS)}")
        if self.entropy_positions not in ENTROPY_POSITIONS:
            raise bad("entropy_positions", f"expected one of {list(ENTROPY_POSITIONS)}")
        for key in ("tr_weight", "retain_weight", "representation_weight", "weighting_rate"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(key, "expected a finite number >= 0")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise bad("clip_grad_norm", "expected a positive number or null")
        if self.dpo_beta <= 0:
            raise bad("dpo_beta", "expected a positive number")
        if not self.adversaries:
            raise bad("adversaries", "the train-time adversary family is empty; give at least one adversary")
        names = set()
        for i, adv in enumerate(self.adversaries):
            if isinstance(adv, dict):
                adv = self.adversaries[i] = AdversaryConfig.from_dict(adv, where=f"TARConfig.adversaries[{i}]")
            adv.validate()
            if adv.warmup_steps >= self.inner_steps and adv.schedule != "constant":
                raise ConfigError(
                    f"TARConfig.adversaries[{i}] ({adv.name!r}): warmup_steps={adv.warmup_steps} must be < "
                    f"inner_steps={self.inner_steps}, the length of a train-time attack"
                )
            if adv.name in names:
                raise ConfigError(f"TARConfig.adversaries[{i}].name={adv.name!r}: adversary names must be unique")
            names.add(adv.name)
        if self.snapshot_device not in (None, "cpu"):
            raise bad("snapshot_device", "expected null (next to the weights) or 'cpu'")
        value = self.max_nonfinite_in_a_row
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("max_nonfinite_in_a_row", "expected a positive integer (skipped non-finite steps in a row)")
        return self

    # -- derived quantities -------------------------------------------------------------------------------

    def tr_points(self) -> list[int]:
        """Inner-step indices k (0-based) after whose adversary update the TR loss is evaluated."""
        return [k for k in range(self.inner_steps) if (k + 1) % self.tr_every == 0]

    def tr_weights(self) -> list[float]:
        """w_k for every TR point, as in TAR_METHOD.md (before λ_TR and the 1/T trajectory average)."""
        points = self.tr_points()
        if self.weighting == "uniform":
            weights = [1.0 / len(points)] * len(points)
        else:
            last = self.inner_steps - 1
            weights = [math.exp(self.weighting_rate * (k - last)) for k in points]
        if self.normalize_weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        return weights

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches each data stream must supply per outer step."""
        steps: dict[str, int] = {}

        def need(stream: str, n: int) -> None:
            steps[stream] = max(steps.get(stream, 0), n)

        need(self.retain_stream, 1)
        need(self.tr_stream, self.trajectories)
        for adv in self.adversaries:
            need(adv.data, self.trajectories * self.inner_steps)
            if adv.switch is not None:
                need(adv.switch.retain_stream, self.trajectories * self.inner_steps)
        return steps
