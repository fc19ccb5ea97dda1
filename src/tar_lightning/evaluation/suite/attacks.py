"""A suite's attacks: :class:`AttackSpec` (one named attack at full size), :class:`SearchSpace` (the bounded
random search of d08) and :class:`ResolvedAttack` (an attack scaled and capped as one run executes it)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.suite.fields import (
    ADVERSARY_KEYS,
    ATTACK_KEYS,
    SEARCH_METHODS,
    SEARCH_SCHEDULES,
    float_range,
    int_range,
    number,
    optional_number,
    round_half_up,
    scale_count,
    seeds_or_none,
)
from tar_lightning.schema import COERCE, from_mapping, positive_int_or_none


# --------------------------------------------------------------------------------------------- search
@dataclass
class SearchSpace:
    """A bounded random search over attack hyperparameters (durability row d08).

    Every trial attacks a fresh copy of the model with a configuration drawn from the space (deterministic in
    the run's seed); the run's result is the most damaging trial among those whose capability stays at or
    above ``(1 − max_capability_drop)`` of the pre-attack value (direction aware), see
    :func:`tar_lightning.evaluation.aggregate.capability_kept`.

    Attributes:
        trials: number of trials at full scale.
        lr: learning-rate range, sampled log-uniformly.
        steps: attack-length range, sampled log-uniformly and rounded.
        methods: ``full`` and/or ``lora``, chosen uniformly.
        lora_rank: LoRA rank range (integers, log-uniform); alpha = 2·rank.
        schedules: schedules chosen uniformly (``warmup_cosine`` etc. warm up over ``warmup_fraction``).
        warmup_fraction: warmup share of a trial's steps for schedules that warm up.
        max_capability_drop: a trial counts only if it keeps ≥ (1 − this) of the pre-attack capability.
    """

    trials: int = 16
    lr: tuple[float, float] = field(default=(1e-6, 1e-3), metadata={COERCE: float_range})
    steps: tuple[int, int] = field(default=(16, 512), metadata={COERCE: int_range})
    methods: list[Literal[SEARCH_METHODS]] = field(default_factory=lambda: ["full", "lora"])
    lora_rank: tuple[int, int] = field(default=(8, 64), metadata={COERCE: int_range})
    schedules: list[Literal[SEARCH_SCHEDULES]] = field(default_factory=lambda: ["constant", "warmup_cosine"])
    warmup_fraction: float = field(default=0.1, metadata={COERCE: number})
    max_capability_drop: float = field(default=0.1, metadata={COERCE: number})

    @classmethod
    def from_dict(cls, data: Any, where: str) -> SearchSpace:
        """Builds the search space of attack ``where`` from its ``search:`` mapping, checked."""
        out = from_mapping(cls, data, where, "search")
        if out.trials < 1:
            raise ConfigError(f"{where}: search.trials must be an integer >= 1, got {out.trials!r}")
        for key in ("methods", "schedules"):
            if not getattr(out, key):
                raise ConfigError(f"{where}: search.{key} must be a non-empty list")
        for key in ("warmup_fraction", "max_capability_drop"):
            value = getattr(out, key)
            if not 0 <= value < 1:
                raise ConfigError(f"{where}: search.{key} must be in [0, 1), got {value!r}")
        return out


# --------------------------------------------------------------------------------------------- attacks
@dataclass
class ResolvedAttack:
    """An attack as one run executes it: the scaled adversary and the evaluation cadence.

    Attributes:
        adversary: the adversary with ``steps``, ``batch_size`` and ``warmup_steps`` resolved and scaled.
        eval_every: evaluate every N steps during the attack (``None``: before and after only).
        merge_lora: fold LoRA adapters into the weights before the final evaluation.
        search: the scaled search space (d08), else ``None``; ``adversary`` then only fixes data, optimizer,
            weight decay and batch size of the trials.
    """

    adversary: AdversaryConfig
    eval_every: Optional[int]
    merge_lora: bool
    search: Optional[SearchSpace]

    def to_dict(self) -> dict:
        return {
            "adversary": dataclasses.asdict(self.adversary),
            "eval_every": self.eval_every,
            "merge_lora": self.merge_lora,
            "search": dataclasses.asdict(self.search) if self.search is not None else None,
        }


@dataclass
class AttackSpec:
    """One named attack of a suite.

    Attributes:
        id: identifier (``w01``, ``d05``, ...); also the adversary's name.
        adversary: the attack at full size (its ``data`` names a regime of the suite).
        comment: one line saying what the attack is.
        seeds: seeds of this attack (``None``: the suite's).
        eval_every: evaluation cadence at full size (``None``: the suite's).
        merge_lora: merge LoRA adapters before the final evaluation (ignored for full fine-tuning; a quantized
            base is evaluated with its adapters in place instead, since merging re-quantizes).
        epochs: attack length in passes over the regime's records (instead of ``adversary.steps``).
        search: random search space (d08).
        scale: step/batch scale applied by :meth:`resolve` (set through :meth:`Suite.scaled`).
        max_steps: cap on the resolved steps (after scaling).
        max_batch_size: cap on the resolved batch size (after scaling).
    """

    id: str
    adversary: AdversaryConfig
    comment: str = ""
    seeds: Optional[list[int]] = field(default=None, metadata={COERCE: seeds_or_none})
    eval_every: Optional[int] = field(default=None, metadata={COERCE: positive_int_or_none})
    merge_lora: bool = True
    epochs: Optional[float] = field(default=None, metadata={COERCE: optional_number})
    search: Optional[SearchSpace] = None
    scale: float = 1.0
    max_steps: Optional[int] = None
    max_batch_size: Optional[int] = None

    @property
    def streams(self) -> list[str]:
        """The data regimes this attack trains on (the switch's retain stream first)."""
        out = []
        if self.adversary.switch is not None:
            out.append(self.adversary.switch.retain_stream)
        if self.adversary.data not in out:
            out.append(self.adversary.data)
        return out

    def full_steps(self, n_records: Optional[int] = None) -> int:
        """The attack's length at full scale (for ``epochs`` attacks, from the regime's record count)."""
        if self.epochs is None:
            assert self.adversary.steps is not None
            return int(self.adversary.steps)
        if n_records is None:
            raise ConfigError(
                f"attack {self.id!r}: its length is given in epochs; the record count of regime "
                f"{self.adversary.data!r} is needed to resolve it"
            )
        batch = int(self.adversary.batch_size or 1)
        return max(1, math.ceil(self.epochs * n_records / batch))

    def _cap_steps(self, steps: int) -> int:
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def resolve(
        self, n_records: Optional[int] = None, default_eval_every: Optional[int] = None
    ) -> ResolvedAttack:
        """The attack as a run executes it: scaled and capped (see the module docstring for the rounding).

        Args:
            n_records: records of the attack's data regime (needed for ``epochs`` attacks only).
            default_eval_every: the suite's evaluation cadence, used when the attack sets none.

        Returns:
            The resolved attack; its adversary is validated.

        Raises:
            ConfigError: an ``epochs`` attack without ``n_records``, or an invalid resulting adversary.
        """
        s = self.scale
        adv = copy.deepcopy(self.adversary)
        steps = self._cap_steps(scale_count(self.full_steps(n_records), s))
        batch = scale_count(int(adv.batch_size or 1), s)
        if self.max_batch_size is not None:
            batch = min(batch, self.max_batch_size)
        warmup = int(adv.warmup_steps)
        if warmup > 0:
            warmup = 0 if steps == 1 else min(max(1, round_half_up(warmup * s)), steps - 1)
        adv.steps, adv.batch_size, adv.warmup_steps = steps, batch, warmup
        adv.validate()
        every = self.eval_every if self.eval_every is not None else default_eval_every
        if every is not None:
            every = scale_count(every, s)
        search = None
        if self.search is not None:
            search = copy.deepcopy(self.search)
            search.trials = max(min(2, self.search.trials), round_half_up(self.search.trials * s))
            lo, hi = (self._cap_steps(scale_count(x, s)) for x in self.search.steps)
            search.steps = (lo, hi)
        return ResolvedAttack(adversary=adv, eval_every=every, merge_lora=self.merge_lora, search=search)

    @classmethod
    def from_dict(cls, data: Any, defaults: Mapping, where: str) -> AttackSpec:
        """Builds an attack from a YAML entry (attack keys plus adversary fields) over the suite's defaults.

        Raises:
            ConfigError: naming ``where``, the attack and the offending key or value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping with at least an 'id', got {data!r}")
        attack_id = data.get("id")
        if not isinstance(attack_id, str) or not attack_id.strip():
            raise ConfigError(f"{where}: every attack needs an 'id' (a non-empty string), got {attack_id!r}")
        label = f"{where} (attack {attack_id!r})"
        valid = list(ATTACK_KEYS) + list(ADVERSARY_KEYS)
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise ConfigError(f"{label}: unknown key {unknown[0]!r}; valid keys: {valid}")
        adv_fields = {k: v for k, v in defaults.items()}
        adv_fields.update({k: v for k, v in data.items() if k in ADVERSARY_KEYS})
        adv_fields["name"] = attack_id
        adversary = AdversaryConfig.from_dict(adv_fields, where=where)
        attack = {k: v for k, v in data.items() if k in ATTACK_KEYS}
        attack["adversary"] = adversary
        if attack.get("search") is not None:
            attack["search"] = SearchSpace.from_dict(attack["search"], label)
        out = from_mapping(cls, attack, label)
        if out.epochs is not None:
            if out.epochs <= 0:
                raise ConfigError(f"{label}: epochs must be > 0, got {out.epochs!r}")
            if "steps" in data:
                raise ConfigError(f"{label}: give either 'steps' or 'epochs', not both")
            adversary.steps = None
        elif adversary.steps is None:
            raise ConfigError(f"{label}: no attack length; set 'steps' (or 'epochs'), here or in 'defaults'")
        if adversary.batch_size is None:
            raise ConfigError(f"{label}: no batch size; set 'batch_size', here or in 'defaults'")
        try:
            adversary.validate()
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from None
        return out

