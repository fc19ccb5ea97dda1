"""What the red team measures: the metric functions of a suite and the evaluator that runs them.

- :func:`evaluation_mode`: eval mode without gradients, a schedule-free optimizer at its evaluation point;
- the built-in metric kinds (:data:`DEFAULT_METRIC_FNS`): held-out loss and entropy, MCQ accuracy, refusal
  rate and attack success rate (``options.prompt_template`` wraps the prompts, e.g. in a jailbreak preamble:
  docs/REDTEAM_JAILBREAK.md; ``options.second_judge`` judges the same answers a second time and records the
  judges' agreement, :func:`tar_lightning.evaluation.refusal.judge_agreement`), and ``callable`` (a function the
  suite names);
- :class:`SuiteEvaluator` / :func:`build_evaluator`: every metric of a suite's evaluation block; it returns
  :class:`MetricValues`, the values with the judge agreement of refusal metrics that have a second judge;
- :func:`accepts_only` / :func:`evaluator_id`: how the runner calls an evaluator and how results name it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from tar_lightning.data.sources import DataSource, load_records
from tar_lightning.data.tokenize import TokenPool, tokenize_records
from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.evaluation.heldout import heldout_metrics, heldout_texts
from tar_lightning.evaluation.mcq import load_mcq, score_mcq
from tar_lightning.evaluation.refusal import (
    RefusalResult,
    build_judge,
    generate_responses,
    judge_responses,
    load_prompts,
)
from tar_lightning.evaluation.suite import MetricSpec, Suite, check_callable_trust
from tar_lightning.losses import token_entropy
from tar_lightning.snapshot import ParameterSnapshot

__all__ = [
    "DEFAULT_METRIC_FNS",
    "Evaluator",
    "MetricFn",
    "MetricValues",
    "SuiteEvaluator",
    "accepts_only",
    "build_evaluator",
    "chat_heldout_metrics",
    "evaluation_mode",
    "evaluator_id",
]

#: ``evaluator(model, tokenizer[, only=...]) -> {metric: value}``
Evaluator = Callable[..., Mapping[str, float]]
#: ``fn(model, tokenizer, spec, evaluator, options) -> value`` (one metric kind)
MetricFn = Callable[..., float]

#: how :attr:`SuiteEvaluator.fingerprint` names the built-in metric functions (their public package)
_PACKAGE = __name__.rpartition(".")[0]


class MetricValues(dict):
    """``{metric: value}`` as :class:`SuiteEvaluator` returns it (a plain dict to everything that reads values), and
    ``judge_agreement``: per ``refusal_rate`` / ``asr`` metric (or ``<metric>/<variant>``) with an
    ``options.second_judge``, what the second judge said about the same answers: ``kind`` (the metric's),
    ``judge``, ``second_judge``, ``value`` (the metric's value, the first judge's), ``second_value`` (the same
    metric by the second judge) and :func:`~tar_lightning.evaluation.refusal.judge_agreement`'s ``n``,
    ``agreement``, ``kappa`` (``None`` when both judges gave every answer one and the same label), refusal rates
    and 2×2 table. The red team writes it into each run record's ``judge_agreement`` (``before`` / ``after`` /
    ``during``)."""

    def __init__(self, values: Any = (), judge_agreement: Optional[Mapping[str, Mapping]] = None) -> None:
        super().__init__(values)
        self.judge_agreement: dict[str, dict] = {k: dict(v) for k, v in (judge_agreement or {}).items()}

    def copy(self) -> MetricValues:
        return MetricValues(self, self.judge_agreement)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[None]:
    """Within the block the model is in eval mode without gradients, and a schedule-free optimizer holds
    its evaluation weights (``optimizer.eval()``); both modes are switched back afterwards.

    A schedule-free optimizer's ``eval()`` moves the weights to its evaluation point and ``train()`` back to its
    training point, a round trip that is not exact in floating point (elements change by an ulp, depending on the
    weights). So the training point is copied first and written back bit for bit: an attack's trajectory does
    not depend on how often it is evaluated.
    """
    swap = (
        optimizer is not None
        and callable(getattr(optimizer, "eval", None))
        and callable(getattr(optimizer, "train", None))
    )
    groups = optimizer.param_groups if swap else []
    in_train_mode = swap and any(g.get("train_mode", False) for g in groups)
    training_point = (
        ParameterSnapshot([p for g in groups for p in g["params"]])
        if in_train_mode and all("train_mode" in g for g in groups) else None
    )
    was_training = model.training
    if swap:
        optimizer.eval()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if training_point is not None:  # back to the training point bit for bit; the mode flag follows
            training_point.restore()
            for g in groups:
                g["train_mode"] = True
        elif swap:
            optimizer.train()


def chat_heldout_metrics(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted next-token CE and predictive entropy over the *labelled* positions of ready batches
    (``labels`` −100 on prompt and padding), e.g. the harmful responses of held-out prompt/response pairs."""
    device = next(model.parameters()).device
    nll_sum = ent_sum = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
                logits = logits[:, :-1]
                targets = batch["labels"].to(device)[:, 1:]
                keep = targets != -100
                nll_sum += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                        reduction="sum",
                    )
                )
                ent_sum += float(token_entropy(logits)[keep].sum())
                count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise TARLightningError("held-out chat data: no labelled response token to score")
    return {"loss": nll_sum / count, "entropy": ent_sum / count, "tokens": count}


# ------------------------------------------------------------------------------------ built-in metric kinds
def _heldout(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> dict[str, float]:
    source = ev.source_of(spec)
    if source.is_chat:  # prompt/response data: score the responses only (heldout_metrics takes plain text)
        return chat_heldout_metrics(model, ev.chat_batches(spec, tokenizer))
    texts = ev.prepared(spec, lambda: heldout_texts(source, ev.limit_of(spec)))
    return heldout_metrics(
        model, tokenizer, texts, seq_len=ev.seq_len, batch_size=ev.batch_size_of(spec), **options
    )


def _heldout_loss(model, tokenizer, spec, ev, options) -> float:
    return float(ev.cached(("heldout", id(spec), repr(options)), lambda: _heldout(model, tokenizer, spec, ev, options))["loss"])


def _heldout_entropy(model, tokenizer, spec, ev, options) -> float:
    return float(
        ev.cached(("heldout", id(spec), repr(options)), lambda: _heldout(model, tokenizer, spec, ev, options))["entropy"]
    )


def _mcq(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> float:
    items = ev.items_of(spec, load_mcq)
    return float(score_mcq(model, tokenizer, items, batch_size=ev.batch_size_of(spec), **options).accuracy)


def _callable(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> float:
    module_name, _, attr = str(spec.target).partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"metric target {spec.target!r} cannot be imported: {err}") from err
    return float(fn(model, tokenizer, **options))


#: options of a refusal metric that choose how its answers are judged or saved, not how they are generated
_JUDGING_OPTIONS = ("judge", "second_judge", "save_generations")


def _refusal(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> RefusalResult:
    def load():
        load_args = dict(spec.load)
        limit = ev.limit_of(spec)
        if limit is not None:
            load_args.setdefault("limit", limit)
        return load_prompts(spec.path, **load_args)

    prompts = ev.prepared(spec, load)
    args = {"batch_size": ev.batch_size_of(spec), **options}
    judging = {k: args.pop(k) for k in _JUDGING_OPTIONS if k in args}
    judge = build_judge(judging.get("judge"))  # both judges before the (expensive) generation
    second = judging.get("second_judge")
    second = build_judge(second, "second_judge") if second is not None else None
    # One generation per (prompts, generation options: prompt_template, max_new_tokens, ...): `asr` and
    # `refusal_rate` on the same prompts share their answers whatever their judges, while `asr_jailbreak` (the same
    # prompts in a jailbreak template) gets its own. Each judge configuration then judges those answers once.
    key = ("refusal", tuple(prompts), repr(sorted(args.items(), key=str)))
    responses = ev.cached(key, lambda: generate_responses(model, tokenizer, prompts, **args))
    judged = key + (repr(sorted(judging.items(), key=str)),)
    return ev.cached(judged, lambda: judge_responses(
        prompts, responses, judge, second, save_generations=judging.get("save_generations"),
        prompt_template=args.get("prompt_template"),
    ))


def _note_agreement(ev: SuiteEvaluator, result: RefusalResult, kind: str) -> None:
    """With a second judge: its value of the metric ``kind`` and the judges' agreement, noted beside the value."""
    agreement = result.agreement
    if agreement is None:
        return
    value = result.refusal_rate if kind == "refusal_rate" else result.asr
    second = agreement["second_refusal_rate"]
    ev.note_agreement({
        "kind": kind,
        "judge": result.judge,
        "second_judge": result.second_judge,
        "value": float(value),
        "second_value": float(second if kind == "refusal_rate" else 1.0 - second),
        **agreement,
    })


def _refusal_rate(model, tokenizer, spec, ev, options) -> float:
    result = _refusal(model, tokenizer, spec, ev, options)
    _note_agreement(ev, result, "refusal_rate")
    return float(result.refusal_rate)


def _asr(model, tokenizer, spec, ev, options) -> float:
    result = _refusal(model, tokenizer, spec, ev, options)
    _note_agreement(ev, result, "asr")
    return float(result.asr)


#: metric kind -> function (``fn(model, tokenizer, spec, evaluator, options) -> value``)
DEFAULT_METRIC_FNS: dict[str, MetricFn] = {
    "refusal_rate": _refusal_rate,
    "asr": _asr,
    "heldout_loss": _heldout_loss,
    "heldout_entropy": _heldout_entropy,
    "mcq": _mcq,
    "callable": _callable,
}


class SuiteEvaluator:
    """The default evaluator of a suite: computes every metric of its evaluation block.

    Call it as ``evaluator(model, tokenizer, only=None) -> {metric: value}`` (a :class:`MetricValues`, which
    also carries the judge agreement of refusal metrics with a ``second_judge``); ``only`` restricts the
    computed metrics (the runner passes ``evaluation.during`` for evaluations during an attack). Metrics with
    ``variants`` also report ``<metric>/<variant>`` and combine them into ``<metric>``.

    Args:
        suite: the suite (its evaluation block, data regimes and ``seq_len``).
        metric_fns: replaces the function of a metric kind: ``fn(model, tokenizer, spec, evaluator,
            options) -> float`` (``evaluator.source_of(spec)``, ``.seq_len``, ``.batch_size_of(spec)``,
            ``.limit_of(spec)`` give the metric's data and settings).
        trust_callable: allow ``kind: callable`` metrics, which import and run the function the suite names
            (refused with a :class:`ConfigError` otherwise, unless ``metric_fns`` replaces ``callable``).
    """

    def __init__(self, suite: Suite, metric_fns: Optional[Mapping[str, MetricFn]] = None,
                 trust_callable: bool = False) -> None:
        if "callable" not in dict(metric_fns or {}):
            check_callable_trust(suite, trust_callable)
        self.spec = suite.evaluation
        self.regimes = dict(suite.data)
        self.seq_len = suite.seq_len
        self.metric_fns = {**DEFAULT_METRIC_FNS, **dict(metric_fns or {})}
        self._items: dict[int, Any] = {}
        self._cache: Optional[dict] = None
        self._computing: Optional[str] = None
        self._agreement: dict[str, dict] = {}
        if not self.spec.metrics:
            raise ConfigError(
                f"suite {suite.name!r}: evaluation.metrics is empty, so there is no default evaluator; "
                "define metrics or pass evaluator=..."
            )

    @property
    def fingerprint(self) -> str:
        """Names every metric function (part of each run's configuration hash). The built-in ones are named
        under the package, ``tar_lightning.evaluation.redteam._mcq`` ..., as when they lived in one module, so
        result folders written before the package was split still resume."""
        builtin = set(map(id, DEFAULT_METRIC_FNS.values()))
        names = sorted(
            f"{k}={_PACKAGE if id(v) in builtin else getattr(v, '__module__', '')}."
            f"{getattr(v, '__qualname__', repr(v))}"
            for k, v in self.metric_fns.items()
        )
        return "SuiteEvaluator(" + ",".join(names) + ")"

    def source_of(self, spec: MetricSpec) -> DataSource:
        return self.regimes[spec.data] if isinstance(spec.data, str) else spec.data

    def batch_size_of(self, spec: MetricSpec) -> int:
        return spec.batch_size or self.spec.batch_size

    def limit_of(self, spec: MetricSpec) -> Optional[int]:
        return spec.limit if spec.limit is not None else self.spec.limit

    def items_of(self, spec: MetricSpec, loader: Callable) -> Any:
        """The MCQ items of a metric, loaded once (first ``limit`` items)."""

        def load():
            items = loader(spec.path, **spec.load)
            limit = self.limit_of(spec)
            return list(items)[:limit] if limit is not None else items

        return self.prepared(spec, load)

    def prepared(self, spec: MetricSpec, build: Callable[[], Any]) -> Any:
        """Data a metric reuses at every evaluation (texts, items, batches), built on first use."""
        key = id(spec)
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]

    def chat_batches(self, spec: MetricSpec, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
        """Padded batches of a chat source's first ``limit`` records, prompt tokens labelled −100."""

        def build():
            source = self.source_of(spec)
            records = load_records(source)
            limit = self.limit_of(spec)
            pool = TokenPool(tokenize_records(records[:limit] if limit else records, source, tokenizer, self.seq_len))
            size = self.batch_size_of(spec)
            pad = int(tokenizer.pad_token_id)
            return [pool.collate(list(range(i, min(len(pool), i + size))), pad) for i in range(0, len(pool), size)]

        return self.prepared(spec, build)

    def note_agreement(self, details: Mapping[str, Any]) -> None:
        """Called by a metric function: the judge agreement to record beside the value it is computing (under the
        metric's name, or ``<metric>/<variant>``); see :class:`MetricValues`."""
        if self._computing is not None:
            self._agreement[self._computing] = dict(details)

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        if self._cache is None:
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def __call__(
        self, model: nn.Module, tokenizer: Any, only: Optional[Sequence[str]] = None
    ) -> MetricValues:
        out: dict[str, float] = {}
        self._cache = {}
        self._agreement = {}
        try:
            for name, spec in self.spec.metrics.items():
                if only is not None and name not in only:
                    continue
                fn = self.metric_fns.get(spec.kind)
                if fn is None:
                    raise ConfigError(f"metric {name!r}: no function for kind {spec.kind!r}")
                if spec.variants:
                    values = []
                    for variant, overrides in spec.variants.items():
                        self._computing = f"{name}/{variant}"
                        value = float(fn(model, tokenizer, spec, self, {**spec.options, **overrides}))
                        out[f"{name}/{variant}"] = value
                        values.append(value)
                    combine = {"max": max, "min": min, "mean": lambda v: sum(v) / len(v)}[spec.combine]
                    out[name] = float(combine(values))
                else:
                    self._computing = name
                    out[name] = float(fn(model, tokenizer, spec, self, dict(spec.options)))
            return MetricValues(out, self._agreement)
        finally:
            self._cache = None
            self._computing = None
            self._agreement = {}


def build_evaluator(suite: Suite, metric_fns: Optional[Mapping[str, MetricFn]] = None,
                    trust_callable: bool = False) -> SuiteEvaluator:
    """The default evaluator of ``suite`` (see :class:`SuiteEvaluator`)."""
    return SuiteEvaluator(suite, metric_fns, trust_callable=trust_callable)


def accepts_only(evaluator: Evaluator) -> bool:
    """Whether ``evaluator`` takes ``only=`` (the metrics to compute during an attack)."""
    try:
        params = inspect.signature(evaluator).parameters
    except (TypeError, ValueError):
        return False
    return "only" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def evaluator_id(evaluator: Evaluator) -> str:
    """The name results record for ``evaluator`` (its ``fingerprint`` if it has one, else its qualified name);
    part of every run's configuration hash."""
    fp = getattr(evaluator, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    target = evaluator if inspect.isfunction(evaluator) or inspect.ismethod(evaluator) else type(evaluator)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
