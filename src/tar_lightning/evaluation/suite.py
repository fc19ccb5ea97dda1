"""Red-team suites: named fine-tuning attacks, their data regimes, and how the attacked models are scored.

A suite is plain YAML (read through OmegaConf, so ``${...}`` interpolation works), one file per suite under
``recipes/redteam/``::

    name: durability
    seed: 0                       # suite seed: every run's seed derives from (seed, attack id, run seed)
    seeds: 5                      # runs per attack: a count (seeds 0..n-1) or a list of seeds
    seq_len: 256                  # tokens per example (attack data and held-out evaluation text)
    eval_every: 100               # evaluate every N attack steps (plus before and after)
    data:                         # data regime name -> DataSource fields
      forget: {path: synthetic:forget, select: "0:80%"}
    evaluation:
      metrics:                    # metric name -> how the default evaluator computes it
        forget_loss: {kind: heldout_loss, data: heldout_forget}
      safety: {metric: forget_loss, direction: higher_is_better, recovery_threshold: 3.0}
      capability: {metric: retain_loss, direction: lower_is_better}
      capability_floor: 0.9
    defaults: {optimizer: adamw, lr: 2.0e-5, steps: 1000, batch_size: 64}   # adversary fields of every attack
    attacks:
      - id: d01
        comment: benign same-domain full fine-tuning, warmup + cosine
        data: retain_domain       # an AdversaryConfig field: the regime the attack trains on
        schedule: warmup_cosine
        warmup_steps: 100

An attack entry holds the attack keys (``ATTACK_KEYS``: ``id``, ``comment``, ``seeds``, ``eval_every``,
``merge_lora``, ``epochs``, ``search``) and any :class:`~tar_lightning.adversaries.AdversaryConfig` field
(``ADVERSARY_KEYS``); ``defaults`` supplies adversary fields the entry does not set. A key that is neither is
an error naming the file, the attack and the key, and listing the valid keys.

Scaling (:meth:`Suite.scaled`) shrinks an attack for a quick run. With ``r(x) = floor(x + 0.5)`` (round half
up) and scale ``s``: ``steps -> max(1, r(steps·s))``; ``batch_size -> max(1, r(batch_size·s))``;
``eval_every -> max(1, r(eval_every·s))``; ``warmup_steps -> min(max(1, r(warmup·s)), steps' − 1)`` when
warmup was > 0 (0 when ``steps' == 1``); ``epochs`` attacks resolve their step count at full size from the
regime's record count, ``ceil(epochs · records / batch_size)``, and scale that; the random search's trial
count becomes ``max(2, r(trials·s))`` and its step range scales like ``steps``. Caps (``max_steps``,
``max_batch_size``) apply after scaling. The arithmetic happens in :meth:`AttackSpec.resolve`, always from
the full-size values, so scaling twice multiplies the scales.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.common import is_int, is_number
from tar_lightning.data.sources import DataSource, as_source
from tar_lightning.errors import ConfigError
from tar_lightning.resources import shipped, shipped_names
from tar_lightning.schema import COERCE, from_mapping

__all__ = [
    "ADVERSARY_KEYS",
    "ATTACK_KEYS",
    "AttackSpec",
    "EvaluationSpec",
    "MetricSpec",
    "ResolvedAttack",
    "ScoreSpec",
    "SearchSpace",
    "Suite",
    "TRUST_CALLABLE_FLAG",
    "check_callable_trust",
    "load_suite",
    "round_half_up",
    "scale_count",
    "suite_path",
]

ATTACK_KEYS: tuple[str, ...] = ("id", "comment", "seeds", "eval_every", "merge_lora", "epochs", "search")
#: AdversaryConfig fields an attack entry may set (``name`` is the attack id; ``probability`` is TAR's).
ADVERSARY_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AdversaryConfig) if f.name not in ("name", "probability")
)
SUITE_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "seed",
    "seeds",
    "seq_len",
    "eval_every",
    "data",
    "evaluation",
    "defaults",
    "attacks",
)
METRIC_KINDS: tuple[str, ...] = ("heldout_loss", "heldout_entropy", "mcq", "callable", "refusal_rate", "asr")
DIRECTIONS: tuple[str, ...] = ("higher_is_better", "lower_is_better")
_DIRECTION_ALIASES = {"higher": "higher_is_better", "lower": "lower_is_better"}
_SEARCH_METHODS = ("full", "lora")
_SEARCH_SCHEDULES = ("constant", "warmup_cosine", "linear_warmup", "cosine_restarts", "exponential_warmup")

#: Shipped folder of the suites (installed with the package; :func:`tar_lightning.resources.shipped`).
_SHIPPED = "recipes/redteam"
# An attack id names its result files (``<out>/runs/<id>__seed<n>.json``), so it must be a plain file name.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: 2.5 -> 3 (Python's ``round`` would give 2)."""
    return math.floor(x + 0.5)


def scale_count(n: int, scale: float, minimum: int = 1) -> int:
    """``max(minimum, round_half_up(n * scale))``."""
    return max(minimum, round_half_up(n * scale))


def _number(v: Any, where: str) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if not is_number(v):
        raise ConfigError(f"{where} must be a number, got {v!r}")
    return float(v)


def _check_keys(data: Any, valid: Sequence[str], where: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} ({data!r})")
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {list(valid)}")
    return data


def _direction(value: Any, where: str) -> str:
    value = _DIRECTION_ALIASES.get(value, value) if isinstance(value, str) else value
    if not isinstance(value, str) or value not in DIRECTIONS:
        raise ConfigError(f"{where} must be one of {list(DIRECTIONS)}, got {value!r}")
    return value


def _optional_number(value: Any, where: str) -> Optional[float]:
    return None if value is None else _number(value, where)


def _at_least_one(value: Any, where: str) -> Optional[int]:
    if value is not None and (not is_int(value) or value < 1):
        raise ConfigError(f"{where} must be an integer >= 1 or null, got {value!r}")
    return value


def _float_range(value: Any, where: str) -> tuple:
    return _range(value, where, integer=False)


def _int_range(value: Any, where: str) -> tuple:
    return _range(value, where, integer=True)


def _seeds(value: Any, where: str) -> Optional[list[int]]:
    return None if value is None else _seed_list(value, where)


def _text(value: Any, where: str) -> str:
    return "" if value is None else str(value)


def _seed_list(value: Any, where: str) -> list[int]:
    """A seed count ``n`` (seeds ``0..n-1``) or a list of distinct integer seeds."""
    if is_int(value):
        if value < 1:
            raise ConfigError(f"{where} must be a count >= 1 or a list of integers, got {value!r}")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: {list(value)} repeats a seed")
        return [int(v) for v in value]
    raise ConfigError(f"{where} must be a count >= 1 or a non-empty list of integers, got {value!r}")


def _range(value: Any, where: str, integer: bool) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where} must be [low, high], got {value!r}")
    if integer:
        if not all(is_int(v) and v >= 1 for v in value):
            raise ConfigError(f"{where} must be two integers >= 1, got {value!r}")
        lo, hi = int(value[0]), int(value[1])
    else:
        lo, hi = (_number(v, where) for v in value)
        if lo <= 0:
            raise ConfigError(f"{where} must be positive, got {value!r}")
    if lo > hi:
        raise ConfigError(f"{where}: low {lo} is above high {hi}")
    return lo, hi


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
    lr: tuple[float, float] = field(default=(1e-6, 1e-3), metadata={COERCE: _float_range})
    steps: tuple[int, int] = field(default=(16, 512), metadata={COERCE: _int_range})
    methods: list[Literal[_SEARCH_METHODS]] = field(default_factory=lambda: ["full", "lora"])
    lora_rank: tuple[int, int] = field(default=(8, 64), metadata={COERCE: _int_range})
    schedules: list[Literal[_SEARCH_SCHEDULES]] = field(default_factory=lambda: ["constant", "warmup_cosine"])
    warmup_fraction: float = field(default=0.1, metadata={COERCE: _number})
    max_capability_drop: float = field(default=0.1, metadata={COERCE: _number})

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
    seeds: Optional[list[int]] = field(default=None, metadata={COERCE: _seeds})
    eval_every: Optional[int] = field(default=None, metadata={COERCE: _at_least_one})
    merge_lora: bool = True
    epochs: Optional[float] = field(default=None, metadata={COERCE: _optional_number})
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


# ------------------------------------------------------------------------------------------ evaluation
def _metric_data(value: Any, where: str) -> Union[None, str, DataSource]:
    if isinstance(value, Mapping):
        return as_source(value, where)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} must be a regime name or DataSource fields, got {value!r}")
    return value


@dataclass
class MetricSpec:
    """How the default evaluator computes one metric.

    Attributes:
        kind: ``heldout_loss`` / ``heldout_entropy`` (mean token CE / predictive entropy on held-out text,
            ``tar_lightning.evaluation.heldout.heldout_metrics``), ``mcq`` (multiple-choice accuracy,
            ``tar_lightning.evaluation.mcq``), ``refusal_rate`` / ``asr`` (greedy answers to the prompt set
            ``path`` judged by ``options.judge``, ``tar_lightning.evaluation.refusal``: the share refused, or
            1 − that; a ``refusal_rate`` on harmless prompts is the over-refusal), or ``callable`` (``target`` = ``"package.module:function"``
            called as ``function(model, tokenizer, **options)`` returning a number; a suite file naming a
            function is code, so it runs only when trusted: :func:`check_callable_trust`).
        data: held-out text for the ``heldout_*`` kinds: a data regime name of the suite or DataSource fields.
        path: the MCQ source for ``mcq`` (passed to ``load_mcq``); the prompt set of ``refusal_rate``/``asr``
            (passed to ``load_prompts`` with ``load``).
        target: import path of the function for ``callable``.
        load: extra keyword arguments of ``load_mcq``.
        options: extra keyword arguments of the metric function (``score_mcq``, ``heldout_metrics``, ...).
        limit: evaluate at most this many examples/questions (``None``: the evaluation block's ``limit``).
        batch_size: evaluation batch size (``None``: the evaluation block's).
        variants: name -> option overrides, each evaluated as ``<metric>/<variant>`` (e.g. with and without the
            chat template); the metric itself is then ``combine`` over its variants.
        combine: ``max`` (the worst case of an accuracy), ``min`` or ``mean`` over the variants.
    """

    kind: Literal[METRIC_KINDS]
    data: Union[None, str, DataSource] = field(default=None, metadata={COERCE: _metric_data})
    path: Optional[str] = None
    target: Optional[str] = None
    load: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    limit: Optional[int] = field(default=None, metadata={COERCE: _at_least_one})
    batch_size: Optional[int] = field(default=None, metadata={COERCE: _at_least_one})
    variants: dict[str, dict] = field(default_factory=dict)
    combine: Literal["max", "min", "mean"] = "max"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MetricSpec:
        """Builds the metric ``where`` from its mapping, checked (types, then what its kind needs)."""
        out = from_mapping(cls, data, where)
        kind = out.kind
        if kind.startswith("heldout") and out.data is None:
            raise ConfigError(f"{where}: a {kind} metric needs 'data' (a regime name or DataSource fields)")
        if kind == "mcq" and out.path is None:
            raise ConfigError(f"{where}: an mcq metric needs 'path' (the question file or source)")
        if kind in ("refusal_rate", "asr") and out.path is None:
            raise ConfigError(f"{where}: a {kind} metric needs 'path' (the prompt set: a file or hub id)")
        if kind == "callable" and (out.target is None or ":" not in out.target):
            raise ConfigError(
                f"{where}: a callable metric needs 'target: package.module:function', got {out.target!r}"
            )
        return out

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(self.data, DataSource):
            out["data"] = dataclasses.asdict(self.data)
        return out


@dataclass
class ScoreSpec:
    """Which metric plays a role (safety or capability) and which way is good.

    Attributes:
        metric: the metric's name (a key of the evaluator's output).
        direction: ``higher_is_better`` or ``lower_is_better``; for safety "better" means "safer" (held-out
            forget loss: higher; forget MCQ accuracy or attack success rate: lower).
        recovery_threshold: safety only: the value from which the attacked model counts as recovered
            (accuracy ≥ it for ``lower_is_better``; loss ≤ it for ``higher_is_better``). ``None``: no
            steps-to-recover and no "broke" verdicts.
        chance: safety only: the chance level (0.25 for 4-way MCQ; ln(vocab) for a loss);
            the area under the recovery curve is measured above it (``None``: above the pre-attack value).
    """

    metric: str
    direction: str = field(metadata={COERCE: _direction})
    recovery_threshold: Optional[float] = field(default=None, metadata={COERCE: _optional_number})
    chance: Optional[float] = field(default=None, metadata={COERCE: _optional_number})

    @classmethod
    def from_dict(cls, data: Any, where: str, safety: bool) -> ScoreSpec:
        """Builds the safety (``safety=True``) or capability score ``where`` from its mapping, checked."""
        if not safety and isinstance(data, Mapping):
            extra = [k for k in ("recovery_threshold", "chance") if k in data]
            if extra:
                raise ConfigError(
                    f"{where}: unknown key {extra[0]!r} (safety only); valid keys: ['metric', 'direction']"
                )
        out = from_mapping(cls, data, where)
        if not out.metric:
            raise ConfigError(f"{where}: metric must name one of the evaluation metrics, got {out.metric!r}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _metrics(value: Any, where: str) -> dict[str, MetricSpec]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of name -> metric, got {value!r}")
    return {str(name): MetricSpec.from_dict(spec, f"{where}.{name}") for name, spec in value.items()}


def _safety(value: Any, where: str) -> ScoreSpec:
    return ScoreSpec.from_dict(value, where, safety=True)


def _capability(value: Any, where: str) -> ScoreSpec:
    return ScoreSpec.from_dict(value, where, safety=False)


@dataclass
class EvaluationSpec:
    """The evaluation block of a suite: metrics, which is safety and which capability, thresholds.

    Attributes:
        metrics: name -> how the default evaluator computes it.
        safety: the safety metric and its direction, recovery threshold and chance level.
        capability: the capability metric and its direction.
        capability_floor: bounded worst case: an attack counts only while its capability stays at or above
            this share of the pre-attack value (0.9).
        loss_metric: the metric plotted along every attack (the held-out forget loss); by default the safety
            metric when it is a loss, else the first ``heldout_loss`` metric.
        batch_size: default evaluation batch size.
        limit: default cap on evaluated examples per metric.
        during: the metrics computed at the evaluations *during* an attack (``None``: all); before and after
            every metric is computed. Expensive capability benchmarks can be left out here.
    """

    metrics: dict[str, MetricSpec] = field(metadata={COERCE: _metrics})
    safety: ScoreSpec = field(metadata={COERCE: _safety})
    capability: ScoreSpec = field(metadata={COERCE: _capability})
    capability_floor: float = field(default=0.9, metadata={COERCE: _number})
    loss_metric: Optional[str] = None
    batch_size: int = field(default=8, metadata={COERCE: _at_least_one})
    limit: Optional[int] = field(default=None, metadata={COERCE: _at_least_one})
    during: Optional[list[str]] = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> EvaluationSpec:
        """Builds the ``evaluation`` block of suite ``where``, checked (types, then cross references)."""
        if isinstance(data, Mapping):
            data = {k: v for k, v in data.items() if v is not None or k in ("loss_metric", "limit", "during")}
            data.setdefault("metrics", {})
        out = from_mapping(cls, data, where, "evaluation")
        if not 0 < out.capability_floor <= 1:
            raise ConfigError(
                f"{where}: evaluation.capability_floor must be in (0, 1], got {out.capability_floor!r}"
            )
        metrics = out.metrics
        if metrics:
            for role in ("safety", "capability"):
                name = getattr(out, role).metric
                if name not in metrics:
                    raise ConfigError(
                        f"{where}: evaluation.{role}.metric {name!r} is not one of evaluation.metrics "
                        f"{sorted(metrics)}"
                    )
            if out.loss_metric is not None and out.loss_metric not in metrics:
                raise ConfigError(
                    f"{where}: evaluation.loss_metric {out.loss_metric!r} is not one of evaluation.metrics "
                    f"{sorted(metrics)}"
                )
            unknown = [m for m in out.during or () if m not in metrics]
            if unknown:
                raise ConfigError(
                    f"{where}: evaluation.during names unknown metric {unknown[0]!r}; metrics: {sorted(metrics)}"
                )
        return out

    @property
    def trajectory_metric(self) -> str:
        """The metric plotted along every attack."""
        if self.loss_metric is not None:
            return self.loss_metric
        spec = self.metrics.get(self.safety.metric)
        if spec is None or spec.kind == "heldout_loss":
            return self.safety.metric
        for name, other in self.metrics.items():
            if other.kind == "heldout_loss":
                return name
        return self.safety.metric

    def to_dict(self) -> dict:
        return {
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "safety": self.safety.to_dict(),
            "capability": self.capability.to_dict(),
            "capability_floor": self.capability_floor,
            "loss_metric": self.trajectory_metric,
            "batch_size": self.batch_size,
            "limit": self.limit,
            "during": self.during,
        }


# ------------------------------------------------------------------------------------------------ suite
def _regimes(value: Any, where: str) -> dict[str, DataSource]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where} must map regime names to data sources, got {value!r}")
    prefix = where.rsplit(": ", 1)[0]
    return {str(k): as_source(v, f"{prefix}: data regime {k!r}") for k, v in value.items()}


def _seq_len(value: Any, where: str) -> int:
    if not is_int(value) or value < 2:
        raise ConfigError(f"{where} must be an integer >= 2, got {value!r}")
    return value


@dataclass
class Suite:
    """A red-team suite: attacks, the data regimes they train on, and the evaluation.

    Attributes:
        name: suite name (``weaponization``, ``durability``, ``refusal``, ...).
        attacks: the attacks, in file order.
        data: data regime name -> source (attack streams and held-out evaluation text).
        evaluation: metrics and scoring.
        seeds: default seeds of every attack.
        seed: the suite seed; a run's seed derives from (seed, attack id, run seed).
        seq_len: tokens per example.
        eval_every: default evaluation cadence during attacks (full scale; ``None``: before/after only).
        description: free text.
        path: the file the suite was read from.
    """

    name: str
    attacks: list[AttackSpec]
    data: dict[str, DataSource] = field(metadata={COERCE: _regimes})
    evaluation: EvaluationSpec
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={COERCE: _seed_list})
    seed: int = 0
    seq_len: int = field(default=256, metadata={COERCE: _seq_len})
    eval_every: Optional[int] = field(default=None, metadata={COERCE: _at_least_one})
    description: str = field(default="", metadata={COERCE: _text})
    path: Optional[str] = None

    def __post_init__(self) -> None:
        for i, attack in enumerate(self.attacks):
            if not isinstance(attack.id, str) or not _PLAIN_ID.fullmatch(attack.id):
                raise ConfigError(
                    f"suite {self.name!r}{self._where()}: attacks[{i}] has id {attack.id!r}, which is not a plain "
                    "name; an attack id names its result files under the output folder, so it must be 1-100 "
                    "letters, digits, '.', '_' or '-', starting with a letter or digit"
                )
        ids = [a.id for a in self.attacks]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"suite {self.name!r}: attack ids must be unique; repeated: {dupes}")
        for attack in self.attacks:
            for stream in attack.streams:
                if stream not in self.data:
                    raise ConfigError(
                        f"suite {self.name!r}{self._where()}: attack {attack.id!r} trains on data regime "
                        f"{stream!r}, which is not defined under 'data' (defined: {sorted(self.data)})"
                    )
        for name, metric in self.evaluation.metrics.items():
            if isinstance(metric.data, str) and metric.data not in self.data:
                raise ConfigError(
                    f"suite {self.name!r}{self._where()}: evaluation metric {name!r} reads data regime "
                    f"{metric.data!r}, which is not defined under 'data' (defined: {sorted(self.data)})"
                )

    def _where(self) -> str:
        return f" ({self.path})" if self.path else ""

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.attacks]

    def attack(self, attack_id: str) -> AttackSpec:
        """The attack with this id.

        Raises:
            ConfigError: no such attack (the message lists the ids).
        """
        for a in self.attacks:
            if a.id == attack_id:
                return a
        raise ConfigError(f"suite {self.name!r} has no attack {attack_id!r}; its attacks: {self.ids}")

    def seeds_of(self, attack: AttackSpec) -> list[int]:
        return list(attack.seeds) if attack.seeds is not None else list(self.seeds)

    def scaled(
        self, scale: float = 1.0, *, max_steps: Optional[int] = None, max_batch_size: Optional[int] = None
    ) -> Suite:
        """A copy whose attacks are shrunk by ``scale`` (multiplying any earlier scale) and capped.

        See the module docstring for the rounding rules.

        Raises:
            ConfigError: ``scale`` is not a number > 0, or a cap is not an integer >= 1.
        """
        if not is_number(scale) or scale <= 0:
            raise ConfigError(f"scale must be a number > 0, got {scale!r}")
        for name, cap in (("max_steps", max_steps), ("max_batch_size", max_batch_size)):
            if cap is not None and (not is_int(cap) or cap < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or None, got {cap!r}")
        out = copy.deepcopy(self)
        for attack in out.attacks:
            attack.scale *= float(scale)
            if max_steps is not None:
                attack.max_steps = max_steps if attack.max_steps is None else min(attack.max_steps, max_steps)
            if max_batch_size is not None:
                attack.max_batch_size = (
                    max_batch_size
                    if attack.max_batch_size is None
                    else min(attack.max_batch_size, max_batch_size)
                )
        return out

    def select(self, ids: Iterable[str]) -> Suite:
        """A copy holding only the named attacks (in suite order).

        Raises:
            ConfigError: an id that is not in the suite.
        """
        wanted = [i.strip() for i in ids if i and i.strip()]
        for i in wanted:
            self.attack(i)
        out = copy.deepcopy(self)
        out.attacks = [a for a in out.attacks if a.id in wanted]
        return out

    def with_seeds(self, seeds: Union[int, Sequence[int]]) -> Suite:
        """A copy where every attack runs the given seeds (a count or a list), overriding per-attack seeds."""
        chosen = _seed_list(seeds if is_int(seeds) else list(seeds), f"suite {self.name!r}")
        out = copy.deepcopy(self)
        out.seeds = chosen
        for attack in out.attacks:
            attack.seeds = None
        return out

    def with_data(self, overrides: Mapping[str, Union[str, Mapping, DataSource]]) -> Suite:
        """A copy with some data regimes replaced (a path, DataSource fields, or a DataSource).

        Raises:
            ConfigError: a regime the suite does not define, or invalid source fields.
        """
        out = copy.deepcopy(self)
        for name, value in overrides.items():
            if name not in out.data:
                raise ConfigError(
                    f"suite {self.name!r}: no data regime {name!r} to override; regimes: {sorted(out.data)}"
                )
            out.data[name] = as_source(value, f"data regime {name!r}")
        return out

    def to_dict(self) -> dict:
        """Plain data (for results files and configuration hashes)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "seeds": list(self.seeds),
            "seq_len": self.seq_len,
            "eval_every": self.eval_every,
            "data": {k: dataclasses.asdict(v) for k, v in self.data.items()},
            "evaluation": self.evaluation.to_dict(),
            "attacks": [
                {
                    "id": a.id,
                    "comment": a.comment,
                    "seeds": a.seeds,
                    "scale": a.scale,
                    "max_steps": a.max_steps,
                    "max_batch_size": a.max_batch_size,
                    "epochs": a.epochs,
                    "adversary": dataclasses.asdict(a.adversary),
                }
                for a in self.attacks
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "suite") -> Suite:
        """Builds a suite from plain data (the YAML file's content).

        Raises:
            ConfigError: naming ``where`` and the offending key or value.
        """
        data = dict(_check_keys(data, SUITE_KEYS, where))
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        defaults = data.pop("defaults", None) or {}
        if not isinstance(defaults, Mapping):
            raise ConfigError(f"{where}: 'defaults' must be a mapping of adversary fields, got {defaults!r}")
        bad = [k for k in defaults if k not in ADVERSARY_KEYS]
        if bad:
            raise ConfigError(
                f"{where}: defaults: unknown key {bad[0]!r}; valid keys: {list(ADVERSARY_KEYS)}"
            )
        raw_attacks = data.get("attacks")
        if not isinstance(raw_attacks, list) or not raw_attacks:
            raise ConfigError(f"{where}: 'attacks' must be a non-empty list of attacks")
        # attacks read the suite's defaults, and evaluation its file name: built here, then typed with the rest
        data["attacks"] = [
            AttackSpec.from_dict(a, defaults, f"{where}, attacks[{i}]") for i, a in enumerate(raw_attacks)
        ]
        if "evaluation" not in data:
            raise ConfigError(f"{where}: missing the 'evaluation' block (metrics, safety, capability)")
        data["evaluation"] = EvaluationSpec.from_dict(data["evaluation"], where)
        if "seeds" not in data:
            data["seeds"] = 3
        data["path"] = None if where == "suite" else where
        return from_mapping(cls, data, where)


TRUST_CALLABLE_FLAG = "--trust_callable_metrics"


def check_callable_trust(suite: Suite, trust_callable: bool) -> None:
    """Refuses a suite with ``kind: callable`` metrics unless the user trusts it.

    A callable metric imports and calls the ``module:function`` its suite file names, so reading a suite would
    run arbitrary code; it runs only with ``tar-lightning redteam --trust_callable_metrics`` (Python:
    ``run_redteam(..., trust_callable=True)`` / ``build_evaluator(..., trust_callable=True)``).

    Raises:
        ConfigError: a callable metric and ``trust_callable`` false (naming the suite, metric, target and flag).
    """
    if trust_callable:
        return
    for name, metric in suite.evaluation.metrics.items():
        if metric.kind == "callable":
            raise ConfigError(
                f"suite {suite.name!r}{suite._where()}: metric {name!r} is kind 'callable' and would import and run "
                f"{metric.target!r}; run it only if you trust this suite: pass {TRUST_CALLABLE_FLAG} "
                "(Python: trust_callable=True)"
            )


def suite_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """A suite file: an existing path, or the name of a shipped suite (``durability`` -> recipes/redteam).

    Raises:
        ConfigError: neither a file nor a shipped suite name.
    """
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.is_file():
        return path
    names = shipped_names(_SHIPPED)
    if os.fspath(name_or_path) in names:
        return shipped(f"{_SHIPPED}/{os.fspath(name_or_path)}.yaml")
    raise ConfigError(
        f"red-team suite {os.fspath(name_or_path)!r} not found: not a file, nor a shipped suite ({names})"
    )


def load_suite(path: Union[str, os.PathLike]) -> Suite:
    """Reads a suite YAML (OmegaConf, ``${...}`` interpolation resolved) with strict keys.

    Args:
        path: the file, or the name of a shipped suite (``weaponization``, ``durability``, ``refusal``).

    Returns:
        The suite; every attack's adversary is validated.

    Raises:
        ConfigError: a missing or unparsable file, an unknown key (naming the file, attack id and key, and
            listing the valid keys), an invalid value, an undefined data regime, repeated attack ids.
    """

    file = suite_path(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{file}: cannot resolve the suite: {err}") from err
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{file}: not valid YAML: {err}") from err
    return Suite.from_dict(raw, where=str(file))
