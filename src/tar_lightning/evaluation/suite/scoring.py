"""How a suite scores attacked models: :class:`MetricSpec` (how one metric is computed), :class:`ScoreSpec`
(which metric is safety or capability, and which way is better) and :class:`EvaluationSpec` (the
``evaluation`` block)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from tar_lightning.data.sources import DataSource, as_source, check_prompt_template
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.refusal import check_judge_spec, evaluate_refusal
from tar_lightning.evaluation.suite.fields import (
    METRIC_KINDS,
    direction,
    number,
    optional_number,
)
from tar_lightning.schema import COERCE, from_mapping, positive_int_or_none

# ------------------------------------------------------------------------------------------ evaluation
#: the options a ``refusal_rate`` / ``asr`` metric takes (keyword arguments of ``evaluate_refusal``)
REFUSAL_OPTIONS: tuple[str, ...] = tuple(
    n for n in inspect.signature(evaluate_refusal).parameters if n not in ("model", "tokenizer", "prompts")
)


def _check_refusal_options(kind: str, label: str, opts: Mapping, where: str) -> None:
    """The judge options of a metric's ``options`` (or one variant's overrides), checked when the suite loads: a
    refusal metric's keys, and its ``judge`` / ``second_judge`` specs (:func:`check_judge_spec`, no model loaded)."""
    refusal = kind in ("refusal_rate", "asr")
    if refusal:
        unknown = [k for k in opts if k not in REFUSAL_OPTIONS]
        if unknown:
            raise ConfigError(
                f"{where}.{label}: unknown key {unknown[0]!r} (a {kind} metric takes {list(REFUSAL_OPTIONS)})"
            )
    for key in ("judge", "second_judge"):
        if opts.get(key) is None:  # absent, or null: the phrase judge / no second judge (e.g. in one variant)
            continue
        if kind == "callable":  # a callable metric's options are its function's own keyword arguments
            continue
        if not refusal:
            raise ConfigError(f"{where}.{label}.{key}: only refusal_rate/asr metrics are judged, not a {kind} metric")
        check_judge_spec(opts[key], f"{where}.{label}.{key}")


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
            1 − that; a ``refusal_rate`` on harmless prompts is the over-refusal; ``options.prompt_template``, a
            string with ``{prompt}`` once, wraps every prompt first, e.g. in a jailbreak preamble;
            ``options.second_judge``, another judge spec, judges the same answers again: the value stays the
            first judge's and each run records the second judge's value, the agreement and Cohen's kappa beside
            it, ``judge_agreement``; the options are checked when the suite loads: :data:`REFUSAL_OPTIONS`, and
            the judge specs' forms, kinds and keys), or ``callable`` (``target`` = ``"package.module:function"``
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
    limit: Optional[int] = field(default=None, metadata={COERCE: positive_int_or_none})
    batch_size: Optional[int] = field(default=None, metadata={COERCE: positive_int_or_none})
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
        for label, opts in [("options", out.options)] + [
            (f"variants.{name}", v) for name, v in out.variants.items() if isinstance(v, Mapping)
        ]:
            if opts.get("prompt_template") is None:  # absent, or null: no template (e.g. in one variant)
                continue
            if kind not in ("refusal_rate", "asr", "callable"):
                raise ConfigError(
                    f"{where}.{label}.prompt_template: only refusal_rate/asr metrics take a prompt template; for "
                    "held-out chat data set 'prompt_template' on the data source"
                )
            if kind != "callable":
                check_prompt_template(opts["prompt_template"], f"{where}.{label}.prompt_template")
        for label, opts in [("options", out.options)] + [
            (f"variants.{name}", v) for name, v in out.variants.items() if isinstance(v, Mapping)
        ]:
            _check_refusal_options(kind, label, opts, where)
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
    direction: str = field(metadata={COERCE: direction})
    recovery_threshold: Optional[float] = field(default=None, metadata={COERCE: optional_number})
    chance: Optional[float] = field(default=None, metadata={COERCE: optional_number})

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
    capability_floor: float = field(default=0.9, metadata={COERCE: number})
    loss_metric: Optional[str] = None
    batch_size: int = field(default=8, metadata={COERCE: positive_int_or_none})
    limit: Optional[int] = field(default=None, metadata={COERCE: positive_int_or_none})
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

