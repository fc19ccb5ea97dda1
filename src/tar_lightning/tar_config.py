"""Hyperparameters of TAR's adversarial meta-training (stage 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.common import is_int, is_number
from tar_lightning.errors import ConfigError
from tar_lightning.losses.entropy import ENTROPY_POSITIONS, token_ids_problem
from tar_lightning.schema import from_mapping

__all__ = ["TARConfig"]


TR_LOSSES = ("max_entropy", "neg_ce", "dpo")
WEIGHTINGS = ("uniform", "exponential")
PERSISTENT_STATES = ("delta", "full")


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
        entropy_tokens: token ids the max-entropy loss is restricted to (``null``, default: the whole vocabulary).
            The entropy is then that of the model's distribution renormalised to these tokens, ``softmax`` of their
            logits alone; its maximum is ``log(len(entropy_tokens))``. Full-vocabulary entropy can be raised by
            moving probability onto tokens that are never answers while the ranking of the possible answers (what
            a multiple-choice evaluation reads) stays intact; restricted to the possible answers' first tokens
            (or an MCQ's answer letters), the loss asks for uncertainty between exactly the candidates. Ids are
            the tokenizer's: e.g. ``[tok(" " + v, add_special_tokens=False).input_ids[0] for v in values]``.
            The loss is then taken only at the positions ``entropy_positions`` selects whose labelled next token is
            one of these ids (where one of the candidates is the answer: a value's first token, not its later
            ones), and is 0 for a batch without such a position. So it is meant for TR data whose labels mark only
            the answer (a stream with ``label_span``, as the demo's facts): with labels over the whole text, every
            position whose next token happens to be a candidate counts, wherever it is. Needs
            ``tr_loss: max_entropy``; at least 2 ids, each once and below the model's vocabulary size (checked
            when fit starts). Costs nothing extra: the softmax runs over these logits only.
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
        persistent_pool: keep up to this many attacked deltas and let later trajectories continue them
            (:mod:`tar_lightning.persistent`; 0: off, the paper's TAR). Each entry is one copy of the trainable
            weights, kept on ``snapshot_device``.
        persistent_probability: chance that a trajectory continues a stored one (when the pool is not empty).
        persistent_horizon: a stored trajectory is retired once it has run this many adversary steps in total.
        persistent_state: what a continued trajectory takes over from the stored one. ``delta`` (default, the
            behaviour before this option): the weight delta only; the continued trajectory starts a fresh
            adversary optimizer and schedule, and its TR weights are those of a K-step trajectory.
            ``full``: the delta *and* the adversary optimizer's state (AdamW moments, step counts, schedule-free
            iterates) and its LR schedule position, so that a continued trajectory is exactly the next K steps
            of one longer attack of L = :meth:`attack_horizon` steps (the schedule is laid out over L; a
            schedule-free adversary's delta is taken at its training point y, not at x). Its TR evaluation
            points are weighted by their *global* step in that attack (:meth:`tr_weights` with ``start``). Each
            pool entry then also holds the optimizer state (AdamW: two more copies of the trainable weights);
            under FSDP2 as this rank's shards, checkpointed per rank like the deltas. Needs ``inner_steps`` to
            be a multiple of ``tr_every``. No extra forward/backward passes.
        fork_every: N > 0 turns on MUDMAN's forked persistent adversary (Sondej et al. 2025): one adversary,
            forked from the current weights every N outer steps (steps 0, N, 2N, ...; a diverged adversary is
            dropped and the next step forks anew, which shifts that cadence), trains K = ``inner_steps`` steps per outer step continuing from its own *absolute* weights and
            optimizer state (it does not follow the outer updates in between, as in MUDMAN's code), and the TR
            gradient is taken at its weights at the evaluation points. A trajectory spans N outer steps, an attack
            of L = N·K steps, at the cost of K adversary steps per outer step; the TR weights and schedule follow
            the global step as with ``persistent_state: full``. MUDMAN itself: K = 1, ``tr_every: 1``, an SGD
            adversary, with ``disruption_mask`` and ``normalize_tr_grad``. Unlike MUDMAN, the TR loss is taken
            after the adversary's step (TAR's convention), not before it. Needs ``trajectories: 1`` and
            ``persistent_pool: 0``; 0 (default): off.
        disruption_mask: MUDMAN's disruption masking (Sondej et al. 2025): before the outer step, every element of
            the tamper-resistance gradient g_TR (the weighted sum over trajectories and evaluation points, after
            the data-parallel average) whose sign differs from that of the retain gradient
            g_R = λ_retain·∇L_retain(θ) at the same element is set to 0 (kept where ``sign(g_TR) == sign(g_R)``,
            as MUDMAN's ``p.grad *= retain.sign() == p.grad.sign()``; an element where g_R is exactly 0 is masked).
            The retain gradient itself is never masked: the outer gradient is ``g_R + mask ⊙ g_TR``, so the TR
            step never works against retention to first order. MUDMAN compares with a running average of the
            retain gradient (momentum ≤ 0.99); here the current step's, i.e. MUDMAN with momentum 0 (an outer
            optimizer with momentum averages the combined gradient afterwards). Needs ``retain_weight > 0``. No
            extra forward/backward passes.
        normalize_tr_grad: MUDMAN's normalised unlearning gradient: g_TR is divided by its global 2-norm (over all
            parameters and FSDP2 shards; taken *before* the disruption mask, as MUDMAN's code does, so a masked
            gradient has norm ≤ λ_TR) and multiplied by ``tr_weight``; the outer gradient is
            ``g_R + λ_TR·(mask ⊙ G)/‖G‖`` with G the TR gradient. ``tr_weight`` is then the TR step's norm (MUDMAN
            calibrates it once on the first batch). No extra passes.
        seed: seeds every random choice of an outer step (adversary, LR, switch point) as a function of
            (seed, outer step, trajectory), so all ranks agree without communication and resume reproduces it.
        tr_stream: name of the held-out forget stream.
        tr_stream_by_data: the TR stream of the trajectories whose adversary trains on a given data stream
            (``{adversary data stream: TR stream}``; the adversary's ``data``, the forget phase of a switch); other
            trajectories use ``tr_stream``. With two halves of the forget set, ``{forget_1: tr_2, forget_2: tr_1}``
            and each adversary once per half, the TR loss is always measured on the half its adversary did not
            train on (relearning that generalises to unseen facts, what an attacker with other forget data does),
            and every fact is trained on and measured in turn. Every key must be some adversary's ``data``.
        retain_stream: name of the retain stream.
        dpo_beta: β of the DPO tamper-resistance loss (paper: 0.1). With ``tr_loss: dpo`` the ``tr_stream`` must be
            a preference stream (``kind: preference``, :mod:`tar_lightning.data.preference`): chosen = refusal,
            rejected = harmful, reference log-probs of the starting model cached by the data module.
        max_nonfinite_in_a_row: an outer step whose losses or outer gradient are NaN/Inf is skipped (weights
            restored, no optimizer step); after this many skipped steps in a row training stops with an error.
    """

    inner_steps: int = 64
    tr_every: int = 4
    trajectories: int = 1
    tr_loss: Literal["max_entropy", "neg_ce", "dpo"] = "max_entropy"
    entropy_positions: Literal["attention", "labels", "all"] = "attention"
    entropy_tokens: Optional[list[int]] = None
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
    persistent_pool: int = 0
    persistent_probability: float = 0.5
    persistent_horizon: int = 256
    persistent_state: Literal["delta", "full"] = "delta"
    fork_every: int = 0
    disruption_mask: bool = False
    normalize_tr_grad: bool = False
    seed: int = 0
    tr_stream: str = "tr"
    tr_stream_by_data: dict[str, str] = field(default_factory=dict)
    retain_stream: str = "retain"
    dpo_beta: float = 0.1
    max_nonfinite_in_a_row: int = 5

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "TARConfig") -> TARConfig:
        """Build and validate a config from plain data (a recipe's ``config:`` mapping).

        Raises:
            ConfigError: an unknown key (the message lists the valid ones), a value of the wrong type, or an
                invalid value or combination (see :meth:`validate`).
        """
        return from_mapping(cls, data, where).validate()

    def validate(self) -> TARConfig:
        """Check every field and every adversary; returns self.

        Raises:
            ConfigError: naming the field, its value and what was expected.
        """

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"TARConfig.{key}={getattr(self, key)!r}: {msg}")

        for key in ("inner_steps", "tr_every", "trajectories"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise bad(key, "expected a positive integer")
        if self.tr_every > self.inner_steps:
            raise bad(
                "tr_every",
                f"must be <= inner_steps={self.inner_steps}, otherwise the tamper-resistance loss is never evaluated",
            )
        if not isinstance(self.tr_loss, str) or self.tr_loss not in TR_LOSSES:
            raise bad("tr_loss", f"expected one of {list(TR_LOSSES)}")
        if not isinstance(self.weighting, str) or self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"expected one of {list(WEIGHTINGS)}")
        if not isinstance(self.entropy_positions, str) or self.entropy_positions not in ENTROPY_POSITIONS:
            raise bad("entropy_positions", f"expected one of {list(ENTROPY_POSITIONS)}")
        if self.entropy_tokens is not None:
            ids = self.entropy_tokens
            problem = token_ids_problem(ids)
            if problem is not None:
                raise bad("entropy_tokens", f"{problem} (or null: the whole vocabulary)")
            if self.tr_loss != "max_entropy":
                raise bad("entropy_tokens", f"restricts the max-entropy loss; tr_loss is {self.tr_loss!r}, set "
                          "tr_loss: max_entropy or entropy_tokens: null")
            self.entropy_tokens = [int(i) for i in ids]
        for key in ("tr_weight", "retain_weight", "representation_weight", "weighting_rate"):
            value = getattr(self, key)
            if not is_number(value) or value < 0:
                raise bad(key, "expected a finite number >= 0")
        if self.clip_grad_norm is not None and not (is_number(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise bad("clip_grad_norm", "expected a positive finite number or null")
        if not is_number(self.dpo_beta) or self.dpo_beta <= 0:
            raise bad("dpo_beta", "expected a finite number > 0 (the paper uses 0.1)")
        for key in ("normalize_weights", "retain_representation", "representation_squared", "disruption_mask",
                    "normalize_tr_grad"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "expected true or false")
        if not is_int(self.seed):
            raise bad("seed", "expected an integer")
        for key in ("tr_stream", "retain_stream"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise bad(key, "expected the name of a data stream (a non-empty string)")
        if not isinstance(self.tr_stream_by_data, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.tr_stream_by_data.items()
        ):
            raise bad("tr_stream_by_data", "expected a mapping {adversary data stream: TR stream} of non-empty names")
        self.tr_stream_by_data = dict(self.tr_stream_by_data)
        if not isinstance(self.adversaries, (list, tuple)):
            raise bad("adversaries", "expected a list of adversaries")
        if not self.adversaries:
            raise bad("adversaries", "the train-time adversary family is empty; give at least one adversary")
        self.adversaries = list(self.adversaries)
        names = set()
        for i, adv in enumerate(self.adversaries):
            if isinstance(adv, Mapping):
                adv = self.adversaries[i] = AdversaryConfig.from_dict(adv, where=f"TARConfig.adversaries[{i}]")
            if not isinstance(adv, AdversaryConfig):
                raise ConfigError(
                    f"TARConfig.adversaries[{i}]={adv!r}: expected an adversary (a mapping of AdversaryConfig keys)"
                )
            adv.validate()
            if adv.method not in ("full", "lora"):
                raise ConfigError(
                    f"TARConfig.adversaries[{i}] ({adv.name!r}): method {adv.method!r} is a test-time attack only; "
                    "TAR's train-time adversaries fine-tune the weights it trains (method 'full' or 'lora'), and its "
                    "tamper-resistance gradient, persistent pool and restore belong to those weights"
                )
            schedule_free = adv.optimizer == "schedule_free_adamw"
            if adv.warmup_steps >= self.inner_steps and (adv.schedule != "constant" or schedule_free):
                warmup = "the schedule-free optimizer's internal warmup, " if schedule_free else ""
                raise ConfigError(
                    f"TARConfig.adversaries[{i}] ({adv.name!r}): warmup_steps={adv.warmup_steps} ({warmup}optimizer "
                    f"{adv.optimizer!r}) must be < inner_steps={self.inner_steps}, the length of a train-time attack"
                )
            if adv.method == "lora" and adv.lora.quantize_base is not None:
                raise ConfigError(
                    f"TARConfig.adversaries[{i}] ({adv.name!r}): lora.quantize_base={adv.lora.quantize_base!r} is not "
                    "supported in a train-time adversary: TAR attacks the weights it trains in place, and its "
                    "tamper-resistance gradient, snapshot and restore belong to those full-precision weights; a "
                    "quantized copy of the base has neither. Set lora.quantize_base: null here (QLoRA attacks are "
                    "for the red team's test-time suites)"
                )
            if adv.name in names:
                raise ConfigError(f"TARConfig.adversaries[{i}].name={adv.name!r}: adversary names must be unique")
            names.add(adv.name)
        unused = sorted(set(self.tr_stream_by_data) - {adv.data for adv in self.adversaries})
        if unused:
            raise bad(
                "tr_stream_by_data",
                f"key(s) {unused} are the data of no adversary (their data streams: "
                f"{sorted({adv.data for adv in self.adversaries})}); a key is the 'data' of the adversaries whose TR "
                "stream it sets",
            )
        if not is_int(self.persistent_pool) or self.persistent_pool < 0:
            raise bad("persistent_pool", "expected an integer >= 0 (0 turns persistent adversaries off)")
        p = self.persistent_probability
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise bad("persistent_probability", "expected a probability in [0, 1]")
        if self.persistent_pool:
            h = self.persistent_horizon
            if not is_int(h) or h <= self.inner_steps:
                raise bad(
                    "persistent_horizon",
                    f"expected an integer > inner_steps={self.inner_steps} (a trajectory of K steps is then retired "
                    "before it is ever continued)",
                )
            if all(a.method == "lora" for a in self.adversaries):
                raise bad("persistent_pool", "only full-parameter trajectories are stored, and every adversary is LoRA")
        if not isinstance(self.persistent_state, str) or self.persistent_state not in PERSISTENT_STATES:
            raise bad("persistent_state", f"expected one of {list(PERSISTENT_STATES)}")
        if self.persistent_state == "full" and not self.persistent_pool and not self.fork_every:
            raise bad("persistent_state", "'full' is what a continued persistent-pool trajectory takes over; set "
                      "persistent_pool > 0 (or fork_every for the forked adversary, which always keeps it)")
        if not is_int(self.fork_every) or self.fork_every < 0:
            raise bad("fork_every", "expected an integer >= 0 (0 turns the forked adversary off)")
        if self.fork_every:
            if self.persistent_pool:
                raise bad("fork_every", "the forked adversary and the persistent pool are alternatives; set "
                          "persistent_pool: 0 or fork_every: 0")
            if self.trajectories != 1:
                raise bad("fork_every", f"the forked adversary is one trajectory per outer step; got "
                          f"trajectories={self.trajectories}, expected 1")
            if all(a.method == "lora" for a in self.adversaries):
                raise bad("fork_every", "only full-parameter adversaries persist, and every adversary is LoRA")
        if self.long_horizon() and self.inner_steps % self.tr_every:
            key = "fork_every" if self.fork_every else "persistent_state"
            raise bad(key, f"needs inner_steps={self.inner_steps} to be a multiple of tr_every={self.tr_every}, so "
                      "the evaluation points of a continued trajectory fall on the same inner steps")
        if self.disruption_mask and not self.retain_weight > 0:
            raise bad("disruption_mask", f"needs retain_weight > 0 (got {self.retain_weight}): the mask keeps the "
                      "TR gradient where its sign agrees with the retain gradient's, which is then 0 everywhere")
        if self.snapshot_device is not None and self.snapshot_device != "cpu":
            raise bad("snapshot_device", "expected null (next to the weights) or 'cpu'")
        value = self.max_nonfinite_in_a_row
        if not is_int(value) or value < 1:
            raise bad("max_nonfinite_in_a_row", "expected a positive integer (skipped non-finite steps in a row)")
        return self

    # -- derived quantities -------------------------------------------------------------------------------

    def tr_points(self) -> list[int]:
        """Inner-step indices k (0-based) after whose adversary update the TR loss is evaluated."""
        return [k for k in range(self.inner_steps) if (k + 1) % self.tr_every == 0]

    def long_horizon(self) -> bool:
        """Whether continued trajectories are one longer attack (``persistent_state: full`` with the pool, or the
        forked adversary): optimizer state and schedule position carried over, TR weights by global step."""
        return bool(self.fork_every) or (bool(self.persistent_pool) and self.persistent_state == "full")

    def attack_horizon(self) -> int:
        """L, the length in adversary steps of the longest attack a trajectory can become: N·K for the forked
        adversary, K·⌈persistent_horizon/K⌉ for the pool with ``persistent_state: full`` (an entry is retired
        once it has run ``persistent_horizon`` steps, at the end of the piece that reaches it), else K."""
        K = self.inner_steps
        if self.fork_every:
            return self.fork_every * K
        if self.long_horizon():
            return K * -(-self.persistent_horizon // K)
        return K

    def tr_weights(self, start: int = 0) -> list[float]:
        """w for every TR point of a trajectory (before λ_TR and the 1/T trajectory average).

        Per trajectory of K steps (the default, and ``persistent_state: delta``; ``start`` is ignored): uniform
        1/E over its E = K/``tr_every`` points, or exponential exp(rate·(k − (K−1))), optionally normalised to sum
        to 1 over the E points.

        With :meth:`long_horizon` a trajectory that has already run ``start`` adversary steps is steps
        ``start .. start+K−1`` of one attack of L = :meth:`attack_horizon` steps, and its point at inner step k
        has the global step g = start + k: uniform 1/(L/``tr_every``), or exponential exp(rate·(g − (L−1))) (the
        last step of the whole attack weighs 1); ``normalize_weights`` divides by the sum over all L/``tr_every``
        points of the whole attack. So the weights of the pieces of one attack are exactly the weights of that
        attack run at once. A fresh trajectory's exponential weights are then exp(−rate·(L−K)) times smaller
        than without the option: lower ``weighting_rate`` (e.g. to about 4/L) or use ``uniform``.

        Args:
            start: adversary steps the trajectory ran in earlier outer steps (0 for a fresh one).
        """
        points = self.tr_points()
        if not self.long_horizon():
            if self.weighting == "uniform":
                weights = [1.0 / len(points)] * len(points)
            else:
                last = self.inner_steps - 1
                weights = [math.exp(self.weighting_rate * (k - last)) for k in points]
            if self.normalize_weights:
                total = sum(weights)
                weights = [w / total for w in weights]
            return weights
        horizon = self.attack_horizon()
        every = [g for g in range(horizon) if (g + 1) % self.tr_every == 0]

        def weight(g: int) -> float:
            if self.weighting == "uniform":
                return 1.0 / len(every)
            return math.exp(self.weighting_rate * (g - (horizon - 1)))

        total = sum(weight(g) for g in every) if self.normalize_weights else 1.0
        return [weight(start + k) / total for k in points]

    def tr_stream_for(self, adversary: AdversaryConfig) -> str:
        """The TR stream of a trajectory of ``adversary`` (``tr_stream_by_data`` of its data, else ``tr_stream``)."""
        return self.tr_stream_by_data.get(adversary.data, self.tr_stream)

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches each data stream must supply per outer step."""
        steps: dict[str, int] = {}

        def need(stream: str, n: int) -> None:
            steps[stream] = max(steps.get(stream, 0), n)

        need(self.retain_stream, 1)
        for adv in self.adversaries:
            need(self.tr_stream_for(adv), self.trajectories)
            need(adv.data, self.trajectories * self.inner_steps)
            if adv.switch is not None:
                need(adv.switch.retain_stream, self.trajectories * self.inner_steps)
        return steps
