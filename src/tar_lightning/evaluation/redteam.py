"""The red team: every attack of a suite, several seeds each, on fresh copies of one model.

For every attack × seed (a *run*) :func:`run_redteam`

1. takes a fresh copy of the model (a deep copy of a base kept where it was loaded; a 4-bit/8-bit reload from
   a folder for QLoRA attacks),
2. seeds every random choice from ``(suite seed, attack id, seed)``,
3. evaluates before the attack, every ``eval_every`` steps during it and after it,
4. attacks with :class:`~tar_lightning.adversaries.AdversaryRun` — the runner TAR's inner loop uses, so a
   test-time attack and a train-time attack with the same configuration are the same code — on seeded,
   shuffled batches of the attack's data regime (retain→forget attacks switch streams at
   ``switch.fraction`` of the steps); LoRA adapters are merged before the final evaluation,
5. writes the run's result atomically to ``out_dir/runs/<attack>__seed<k>.json``.

Finished runs whose file records the same configuration hash are not run again (resume). At the end the
results are aggregated (:mod:`tar_lightning.evaluation.aggregate`) and ``results.json``, ``results.csv``,
``report.md`` and PNG plots are written (:mod:`tar_lightning.evaluation.report`). Reports hold scores only,
never generated text.

With several CUDA devices the runs are spread over them, one process per device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from tar_lightning.adversaries.config import AdversaryConfig, LoRAConfig
from tar_lightning.adversaries.runner import AdversaryRun
from tar_lightning.common import model_fingerprint
from tar_lightning.data.datamodule import stream_permutation
from tar_lightning.data.sources import DataSource, load_records
from tar_lightning.data.tokenize import TokenPool, check_tokenizer, tokenize_records
from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.evaluation import aggregate as agg
from tar_lightning.evaluation.progress import progress as progress_bar
from tar_lightning.evaluation.progress import quiet_hf_progress
from tar_lightning.evaluation.suite import (
    AttackSpec,
    MetricSpec,
    ResolvedAttack,
    SearchSpace,
    Suite,
    check_callable_trust,
    load_suite,
)
from tar_lightning.models import ModelSource, export_pretrained, load_model
from tar_lightning.snapshot import ParameterSnapshot

__all__ = [
    "AttackBatches",
    "Evaluator",
    "RedTeamResult",
    "SuiteEvaluator",
    "build_evaluator",
    "chat_heldout_metrics",
    "evaluation_mode",
    "load_quantized",
    "packed_for_cpu_inference",
    "quiet_hf_progress",
    "run_redteam",
    "run_seed",
    "sample_trial",
]

log = logging.getLogger(__name__)

Evaluator = Callable[..., Mapping[str, float]]
RESULT_VERSION = 1


# ------------------------------------------------------------------------------------------------ seeds
def run_seed(suite_seed: int, attack_id: str, seed: int) -> int:
    """The seed of one run: a 63-bit integer, a pure function of its arguments (stable across processes)."""
    state = np.random.SeedSequence(
        [int(suite_seed) % 2**63, zlib.crc32(attack_id.encode()), int(seed) % 2**63]
    )
    hi, lo = state.generate_state(2, dtype=np.uint32)
    return (int(hi) << 31 | int(lo) >> 1) & (2**63 - 1)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeds torch, numpy and random for the block and restores their previous states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------- batching
class AttackBatches:
    """Seeded, shuffled batches of the attack's data streams.

    Every stream is read in passes; pass ``e`` visits the stream's examples in the order
    ``stream_permutation(seed, stream, e, N)`` (the data module's permutation), ``batch_size`` examples per
    step, each stream with its own cursor (a retain→forget attack does not skip forget examples while it
    trains on retain text). A regime of 10 examples is thus seen for many epochs. Batches are right-padded to
    their longest example.

    Args:
        pools: tokenized examples per stream name.
        batch_size: examples per batch.
        seed: the run's seed.
        pad_id: the tokenizer's pad token id.
        device: where batches are put.
    """

    def __init__(
        self,
        pools: Mapping[str, TokenPool],
        batch_size: int,
        seed: int,
        pad_id: int,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.pools = dict(pools)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.device = device
        self.cursor = {name: 0 for name in self.pools}
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    def indices(self, stream: str) -> list[int]:
        """Pool indices of the next batch of ``stream`` (advances its cursor)."""
        if stream not in self.pools:
            raise ConfigError(f"attack data: no stream {stream!r}; streams: {sorted(self.pools)}")
        n = len(self.pools[stream])
        out = []
        for p in range(self.cursor[stream], self.cursor[stream] + self.batch_size):
            epoch = p // n
            cached = self._perm.get(stream)
            if cached is None or cached[0] != epoch:
                cached = (epoch, stream_permutation(self.seed, stream, epoch, n))
                self._perm[stream] = cached
            out.append(int(cached[1][p % n]))
        self.cursor[stream] += self.batch_size
        return out

    def next(self, stream: str) -> dict[str, torch.Tensor]:
        """The next batch ``{input_ids, attention_mask, labels}`` of ``stream``."""
        indices = self.indices(stream)
        batch = self.pools[stream].collate(indices, self.pad_id)
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch


class _DataCache:
    """Tokenized data regimes of a suite, built once per red team."""

    def __init__(self, regimes: Mapping[str, DataSource], tokenizer: Any, seq_len: int) -> None:
        check_tokenizer(tokenizer, "red team")
        self.regimes = dict(regimes)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self._pools: dict[str, TokenPool] = {}

    def pool(self, name: str) -> TokenPool:
        if name not in self._pools:
            if name not in self.regimes:
                raise ConfigError(f"red team: no data regime {name!r}; regimes: {sorted(self.regimes)}")
            source = self.regimes[name]
            records = load_records(source)
            self._pools[name] = TokenPool(tokenize_records(records, source, self.tokenizer, self.seq_len))
            log.info("red team: data regime %r: %d examples", name, len(self._pools[name]))
        return self._pools[name]


# ---------------------------------------------------------------------------------------------- models
def load_quantized(
    folder: Union[str, os.PathLike],
    quantization: str,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Loads a causal LM with bitsandbytes-quantized linear weights (the base of a QLoRA attack).

    Args:
        folder: a Hugging Face model folder (or hub id).
        quantization: ``nf4`` / ``fp4`` (4-bit, computing in ``dtype``) or ``int8``.
        dtype: dtype of the non-quantized weights and of 4-bit compute.
        device: where the model is put (``device_map={"": device}``; ``cpu`` works with bitsandbytes >= 0.45).

    Raises:
        ConfigError: bitsandbytes missing or an unknown quantization.
        ModelLoadError: the folder cannot be loaded.
    """
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as err:
        raise ConfigError(
            f"a quantized-base (QLoRA) attack needs bitsandbytes: pip install 'tar_lightning[quant]' ({err})"
        ) from err
    if quantization in ("nf4", "fp4"):
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype
        )
    elif quantization == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ConfigError(f"unknown quantization {quantization!r}; expected 'nf4', 'fp4' or 'int8'")
    from tar_lightning.errors import ModelLoadError

    local = Path(os.fspath(folder)).is_dir()
    try:
        with quiet_hf_progress():
            model = AutoModelForCausalLM.from_pretrained(
                os.fspath(folder),
                quantization_config=qconfig,
                device_map={"": str(device)},
                dtype=dtype,
                local_files_only=local,
            )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ModelLoadError(f"cannot load {os.fspath(folder)!r} quantized ({quantization}): {err}") from err
    model.config.use_cache = False
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference at the first eval-mode
    # forward and from then on computes through a kernel without autograd: later training gets silently wrong
    # gradients (the same trap as training a 4-bit model on CPU after generate()). Keep the trainable layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def packed_for_cpu_inference(model: nn.Module) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes repacked for CPU inference (not trainable through)."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(
            getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False
        )
    ]


class _ModelHandle:
    """The model under attack: a base that is never modified, fresh copies per run, quantized reloads."""

    def __init__(self, model: Any, tokenizer: Any, device: str, work_dir: Path) -> None:
        self.device = device
        self.work_dir = work_dir
        self._folder: Optional[str] = None
        self._tmp: Optional[str] = None
        if isinstance(model, (str, os.PathLike, ModelSource)):
            spec = model if isinstance(model, ModelSource) else ModelSource(os.fspath(model))
            self.base, tok = load_model(spec)
            self.tokenizer = tokenizer if tokenizer is not None else tok
            self.source: Optional[ModelSource] = spec
            identity: dict[str, Any] = {"source": spec.source, "dtype": spec.dtype, "seed": spec.seed}
            if spec.overrides:
                identity["overrides"] = spec.overrides
            if spec.kind == "local":
                path = Path(os.path.expanduser(spec.source))
                files = sorted(
                    p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf", ".json")
                )
                identity["files"] = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
                if (path / "config.json").is_file():
                    self._folder = str(path)
            elif spec.kind == "hub":
                self._folder = spec.source
            self.identity = identity
        elif isinstance(model, nn.Module):
            if tokenizer is None:
                raise ConfigError(
                    "run_redteam: a model given as an nn.Module needs its tokenizer (tokenizer=...)"
                )
            self.base, self.tokenizer, self.source = model, tokenizer, None
            self.identity = {"module": type(model).__name__, "weights": model_fingerprint(model)}
        else:
            raise ConfigError(
                "run_redteam: model must be a source (path, hub id, alias, 'tiny'), a ModelSource or an "
                f"nn.Module, got {type(model).__name__}"
            )
        first = next(iter(self.base.parameters()), None)
        self.dtype = first.dtype if first is not None else torch.float32

    def fresh(self, adversary: AdversaryConfig) -> nn.Module:
        """A new copy of the base for one attack, on the device, every weight trainable."""
        if adversary.method == "lora" and adversary.lora.quantize_base is not None:
            return load_quantized(self.folder(), adversary.lora.quantize_base, self.dtype, self.device)
        model = copy.deepcopy(self.base).to(self.device)
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
            p.grad = None
        return model

    def folder(self) -> str:
        """A Hugging Face folder (or hub id) holding the base weights; exported once when needed."""
        if self._folder is None:
            self._tmp = tempfile.mkdtemp(prefix=".base_model-", dir=self.work_dir)
            with quiet_hf_progress():
                self._folder = str(export_pretrained(self.base, self.tokenizer, Path(self._tmp) / "model"))
        return self._folder

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._folder = None


# ------------------------------------------------------------------------------------------ evaluation
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


MetricFn = Callable[..., float]


def _heldout(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> dict[str, float]:
    source = ev.source_of(spec)
    if source.is_chat:  # prompt/response data: score the responses only (heldout_metrics takes plain text)
        return chat_heldout_metrics(model, ev.chat_batches(spec, tokenizer))
    try:
        from tar_lightning.evaluation.heldout import heldout_metrics, heldout_texts
    except ImportError as err:
        raise ConfigError(
            f"metric kind {spec.kind!r} needs tar_lightning.evaluation.heldout.heldout_metrics ({err}); "
            "pass metric_fns={'heldout_loss': ...} or a custom evaluator"
        ) from err
    texts = ev.prepared(spec, lambda: heldout_texts(source, ev.limit_of(spec)))
    return heldout_metrics(
        model, tokenizer, texts, seq_len=ev.seq_len, batch_size=ev.batch_size_of(spec), **options
    )


def chat_heldout_metrics(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted next-token CE and predictive entropy over the *labelled* positions of ready batches
    (``labels`` −100 on prompt and padding), e.g. the harmful responses of held-out prompt/response pairs."""
    from tar_lightning.losses import token_entropy

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


def _heldout_loss(model, tokenizer, spec, ev, options) -> float:
    return float(ev.cached(("heldout", id(spec), repr(options)), lambda: _heldout(model, tokenizer, spec, ev, options))["loss"])


def _heldout_entropy(model, tokenizer, spec, ev, options) -> float:
    return float(
        ev.cached(("heldout", id(spec), repr(options)), lambda: _heldout(model, tokenizer, spec, ev, options))["entropy"]
    )


def _mcq(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> float:
    try:
        from tar_lightning.evaluation.mcq import load_mcq, score_mcq
    except ImportError as err:
        raise ConfigError(
            f"metric kind 'mcq' needs tar_lightning.evaluation.mcq ({err}); pass metric_fns={{'mcq': ...}}"
        ) from err
    items = ev.items_of(spec, load_mcq)
    return float(score_mcq(model, tokenizer, items, batch_size=ev.batch_size_of(spec), **options).accuracy)


def _callable(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> float:
    import importlib

    module_name, _, attr = str(spec.target).partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"metric target {spec.target!r} cannot be imported: {err}") from err
    return float(fn(model, tokenizer, **options))


def _refusal(model, tokenizer, spec: MetricSpec, ev: SuiteEvaluator, options: dict) -> Any:
    from tar_lightning.evaluation.refusal import evaluate_refusal, load_prompts

    def load():
        load_args = dict(spec.load)
        limit = ev.limit_of(spec)
        if limit is not None:
            load_args.setdefault("limit", limit)
        return load_prompts(spec.path, **load_args)

    prompts = ev.prepared(spec, load)
    key = ("refusal", spec.path, repr(sorted(spec.load.items())), repr(sorted(options.items(), key=str)))
    args = {"batch_size": ev.batch_size_of(spec), **options}
    return ev.cached(key, lambda: evaluate_refusal(model, tokenizer, prompts, **args))


def _refusal_rate(model, tokenizer, spec, ev, options) -> float:
    return float(_refusal(model, tokenizer, spec, ev, options).refusal_rate)


def _asr(model, tokenizer, spec, ev, options) -> float:
    return float(_refusal(model, tokenizer, spec, ev, options).asr)


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

    Call it as ``evaluator(model, tokenizer, only=None) -> {metric: value}``; ``only`` restricts the
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
        if not self.spec.metrics:
            raise ConfigError(
                f"suite {suite.name!r}: evaluation.metrics is empty, so there is no default evaluator; "
                "define metrics or pass evaluator=..."
            )

    @property
    def fingerprint(self) -> str:
        names = sorted(
            f"{k}={getattr(v, '__module__', '')}.{getattr(v, '__qualname__', repr(v))}"
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

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        if self._cache is None:
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def __call__(
        self, model: nn.Module, tokenizer: Any, only: Optional[Sequence[str]] = None
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        self._cache = {}
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
                        value = float(fn(model, tokenizer, spec, self, {**spec.options, **overrides}))
                        out[f"{name}/{variant}"] = value
                        values.append(value)
                    combine = {"max": max, "min": min, "mean": lambda v: sum(v) / len(v)}[spec.combine]
                    out[name] = float(combine(values))
                else:
                    out[name] = float(fn(model, tokenizer, spec, self, dict(spec.options)))
        finally:
            self._cache = None
        return out


def build_evaluator(suite: Suite, metric_fns: Optional[Mapping[str, MetricFn]] = None,
                    trust_callable: bool = False) -> SuiteEvaluator:
    """The default evaluator of ``suite`` (see :class:`SuiteEvaluator`)."""
    return SuiteEvaluator(suite, metric_fns, trust_callable=trust_callable)


def _accepts_only(evaluator: Evaluator) -> bool:
    try:
        params = inspect.signature(evaluator).parameters
    except (TypeError, ValueError):
        return False
    return "only" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _evaluator_id(evaluator: Evaluator) -> str:
    fp = getattr(evaluator, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    target = evaluator if inspect.isfunction(evaluator) or inspect.ismethod(evaluator) else type(evaluator)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


# ------------------------------------------------------------------------------------------ one run
@dataclass
class _Task:
    attack: AttackSpec
    seed: int
    resolved: ResolvedAttack
    run_seed: int
    config_hash: str
    config: dict
    path: Path

    @property
    def key(self) -> str:
        return f"{self.attack.id}__seed{self.seed}"


def sample_trial(
    space: SearchSpace, base: AdversaryConfig, rng: np.random.Generator, name: str
) -> AdversaryConfig:
    """One configuration of a bounded random search (d08), drawn from ``rng``.

    LR and steps are log-uniform in their ranges; method, rank (log-uniform integer, alpha = 2·rank) and
    schedule are drawn every time (so the sequence of draws does not depend on earlier choices). Data,
    optimizer, weight decay, batch size and switch come from ``base``.
    """
    lr = float(math.exp(rng.uniform(math.log(space.lr[0]), math.log(space.lr[1]))))
    lo, hi = space.steps
    steps = int(min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))))
    method = space.methods[int(rng.integers(len(space.methods)))]
    r_lo, r_hi = space.lora_rank
    rank = int(min(r_hi, max(r_lo, round(math.exp(rng.uniform(math.log(r_lo), math.log(r_hi)))))))
    schedule = space.schedules[int(rng.integers(len(space.schedules)))]
    warmup = 0
    if schedule != "constant" and steps > 1:
        warmup = min(steps - 1, int(math.floor(steps * space.warmup_fraction)))
    return AdversaryConfig(
        name=name,
        data=base.data,
        method=method,
        lora=LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=base.lora.targets),
        optimizer=base.optimizer,
        optimizer_kwargs=dict(base.optimizer_kwargs),
        lr=lr,
        weight_decay=base.weight_decay,
        schedule=schedule,
        warmup_steps=warmup,
        schedule_kwargs={},
        switch=copy.deepcopy(base.switch),
        steps=steps,
        batch_size=base.batch_size,
    ).validate()


class _Runner:
    """Everything one process needs to execute runs: model handle, data, evaluator, suite."""

    def __init__(
        self,
        suite: Suite,
        handle: _ModelHandle,
        evaluator: Evaluator,
        data: _DataCache,
        progress: bool,
    ) -> None:
        self.suite = suite
        self.handle = handle
        self.evaluator = evaluator
        self.data = data
        self.progress = progress
        self._only = _accepts_only(evaluator)
        spec = suite.evaluation
        self.required = [spec.safety.metric, spec.capability.metric]
        self._before_memo: dict[str, dict[str, float]] = {}

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, optimizer=None, during: bool = False) -> dict[str, float]:
        only = self.suite.evaluation.during if during else None
        with evaluation_mode(model, optimizer):
            if only is not None and self._only:
                values = self.evaluator(model, self.handle.tokenizer, only=only)
            else:
                values = self.evaluator(model, self.handle.tokenizer)
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"the evaluator must return a mapping of metric -> value, got {type(values).__name__}"
            )
        out = {str(k): float(v) for k, v in values.items()}
        if not during:
            missing = [m for m in self.required if m not in out]
            if missing:
                raise ConfigError(
                    f"the evaluator returned {sorted(out)}, without the suite's safety/capability metric(s) "
                    f"{missing}"
                )
        return out

    def _pre_attack(self, model: nn.Module) -> dict[str, float]:
        """The pre-attack evaluation; with the default evaluator (deterministic: losses, greedy generation) it is
        computed once per distinct starting weights and reused by the other runs (generation is expensive)."""
        if not isinstance(self.evaluator, SuiteEvaluator):
            return self.evaluate(model)
        key = model_fingerprint(model)
        if key not in self._before_memo:
            self._before_memo[key] = self.evaluate(model)
        return dict(self._before_memo[key])

    # -- one attack -----------------------------------------------------------------------------------
    def attack_once(
        self,
        adversary: AdversaryConfig,
        eval_every: Optional[int],
        merge_lora: bool,
        seed: int,
        before: Optional[dict[str, float]] = None,
        bar: Any = None,
    ) -> dict[str, Any]:
        """Runs one adversary on a fresh model copy; returns before/after/trajectory/losses."""
        steps = int(adversary.steps)
        device = self.handle.device
        with _seeded(seed):
            model = self.handle.fresh(adversary)
            quantized = adversary.method == "lora" and adversary.lora.quantize_base is not None
            gen = torch.Generator().manual_seed(seed)
            lr = adversary.sample_lr(gen)
            switch = adversary.switch_point(steps, gen)
            if before is None:
                before = self._pre_attack(model)
            trajectory: list[list] = [[0, before]]
            streams = [adversary.data] + ([adversary.switch.retain_stream] if adversary.switch else [])
            batches = AttackBatches(
                {s: self.data.pool(s) for s in streams},
                int(adversary.batch_size),
                seed,
                self.handle.tokenizer.pad_token_id,
                device=device,
            )
            if quantized:
                packed = packed_for_cpu_inference(model)
                if packed:
                    raise TARLightningError(
                        f"attack {adversary.name!r}: 4-bit layers {packed[:3]} were repacked for CPU inference; "
                        "training through them gives wrong gradients"
                    )
            model.train()
            run = AdversaryRun(model, adversary, lr=lr, steps=steps, switch_point=switch)
            _guard_gradients(run, adversary.name)
            losses = []
            try:
                for k in range(steps):
                    losses.append(run.step(batches.next(run.stream_for_step(k))))
                    done = k + 1
                    if bar is not None:
                        bar.update(1)
                    if eval_every and done % eval_every == 0 and done < steps:
                        trajectory.append([done, self.evaluate(model, run.optimizer, during=True)])
                if run.optimizer is not None and callable(getattr(run.optimizer, "eval", None)):
                    run.optimizer.eval()  # schedule-free: the evaluation weights are the attack's result
                if adversary.method == "lora" and merge_lora and not quantized:
                    run.close(merge=True)
                    after = self.evaluate(model)
                else:
                    # Unmerged adapters compute the same function; a quantized base is not merged because
                    # folding the adapters into 4/8-bit weights re-quantizes them.
                    after = self.evaluate(model)
            finally:
                run.close()
            trajectory.append([steps, after])
            loss_values = torch.stack(losses).float().cpu().tolist() if losses else []
            del run, model, batches
        _free_memory(device)
        return {
            "before": before,
            "after": after,
            "trajectory": trajectory,
            "train_loss": loss_values,
            "lr": lr,
            "switch_point": switch,
            "steps": steps,
        }

    def search(self, task: _Task, bar: Any = None) -> dict[str, Any]:
        """Bounded random search (d08): the most damaging trial that keeps enough capability."""
        space = task.resolved.search
        assert space is not None
        base = task.resolved.adversary
        cap = self.suite.evaluation.capability
        safety = self.suite.evaluation.safety
        with _seeded(task.run_seed):
            model = self.handle.fresh(base)
            before = self.evaluate(model)
            del model
        trials, results = [], []
        for i in range(space.trials):
            rng = np.random.default_rng([task.run_seed, i])
            config = sample_trial(space, base, rng, f"{task.attack.id}/trial{i:02d}")
            seed = int(rng.integers(0, 2**62))
            result = self.attack_once(
                config, task.resolved.eval_every, task.resolved.merge_lora, seed, before, bar
            )
            kept = agg.capability_kept(
                before[cap.metric],
                result["after"][cap.metric],
                1.0 - space.max_capability_drop,
                cap.direction,
            )
            results.append(result)
            trials.append(
                {
                    "trial": i,
                    "method": config.method,
                    "lora_rank": config.lora.rank if config.method == "lora" else None,
                    "lr": config.lr,
                    "steps": config.steps,
                    "schedule": config.schedule,
                    "warmup_steps": config.warmup_steps,
                    "after": result["after"],
                    "qualified": kept,
                }
            )
        qualified = [t["trial"] for t in trials if t["qualified"]]
        if qualified:
            chosen = qualified[0]
            for i in qualified[1:]:
                if agg.less_safe(
                    trials[i]["after"][safety.metric],
                    trials[chosen]["after"][safety.metric],
                    safety.direction,
                ):
                    chosen = i
        else:  # nothing kept enough capability: report the trial that kept the most, flagged

            def retained(t):
                b, a = before[cap.metric], t["after"][cap.metric]
                return a - b if cap.direction == "higher_is_better" else b - a

            chosen = max(range(len(trials)), key=lambda i: retained(trials[i]))
        out = dict(results[chosen])
        out["search"] = {"trials": trials, "chosen": chosen, "qualified": bool(qualified)}
        return out

    def execute(self, task: _Task, position: int = 0) -> dict[str, Any]:
        """One attack × seed: the run's full result record."""
        resolved = task.resolved
        total = resolved.adversary.steps if resolved.search is None else None  # trial lengths are drawn later
        bar = _bar(total, f"{task.attack.id} seed {task.seed}", self.progress, position)
        start = time.perf_counter()
        try:
            if resolved.search is not None:
                result = self.search(task, bar)
            else:
                result = self.attack_once(
                    resolved.adversary, resolved.eval_every, resolved.merge_lora, task.run_seed, bar=bar
                )
        finally:
            if bar is not None:
                bar.close()
        record = {
            "version": RESULT_VERSION,
            "attack": task.attack.id,
            "comment": task.attack.comment,
            "seed": task.seed,
            "run_seed": task.run_seed,
            "config_hash": task.config_hash,
            "model": task.config["model"],
            "config": task.config["attack"],
            "device": str(self.handle.device),
            "wall_time_s": time.perf_counter() - start,
        }
        record.update(result)
        return record


def _guard_gradients(run: AdversaryRun, name: str) -> None:
    """Fails the first optimizer step if no trainable parameter received a gradient.

    bitsandbytes 4-bit models on CPU can silently stop producing gradients (e.g. after ``generate()``); an attack that
    trains nothing must not be reported as a harmless attack.
    """
    state = {"checked": False}

    def hook(optimizer, args, kwargs):
        if state["checked"]:
            return
        state["checked"] = True
        if not any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
            raise TARLightningError(
                f"attack {name!r}: no gradient reached any trainable parameter at the first step (a 4-bit "
                "model that ran generate() on CPU, or frozen weights); the attack would train nothing"
            )

    run.optimizer.register_step_pre_hook(hook)


def _free_memory(device: Union[str, torch.device]) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: Optional[int], desc: str, enabled: bool, position: int = 0, unit: str = "step"):
    """A progress bar on a terminal, plain lines in a log file (:func:`~tar_lightning.evaluation.progress.progress`);
    ``None`` when not ``enabled``."""
    return progress_bar(total=total, desc=desc, unit=unit, enabled=enabled, position=position, leave=False)


# ------------------------------------------------------------------------------------------ files
def _atomic_write(path: Path, text: str) -> None:
    """A result file, atomically and with the umask's permissions (the library's one atomic writer)."""
    from tar_lightning.checkpoint import atomic_write_text

    atomic_write_text(path, text, what="red-team result")


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _describe_model(identity: Mapping[str, Any]) -> str:
    if "source" in identity:
        return f"{identity['source']} ({identity.get('dtype')})"
    return f"a {identity.get('module')} module (weights {identity.get('weights')})"


#: what ``write_results`` writes for the folder as a whole (replaced when its runs are another model's)
_SUMMARY_FILES = ("results.json", "results.csv", "report.md")


def _claim_out_dir(out: Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """Refuses an output folder holding red-team results of another model (its run files or results.json name a
    different model identity); with ``overwrite`` deletes them instead. Results of the same model are kept
    (resumed); run files that name no model (older versions) are left to the configuration-hash check."""
    identity = json.loads(_json(identity))  # as the files hold it (tuples are lists)
    found: dict[Path, Any] = {}
    runs = sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
    for path in runs + [out / "results.json"]:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: _load_finished reports it and runs it again
        model = record.get("summary", {}).get("model") if path.name == "results.json" else record.get("model")
        if isinstance(model, dict) and model != identity:
            found[path] = model
    if not found:
        return
    if not overwrite:
        first = next(iter(found.values()))
        raise ConfigError(
            f"{out} holds red-team results of another model ({_describe_model(first)}, {len(found)} file(s), "
            f"e.g. {next(iter(found))}), not of {_describe_model(identity)}: choose another --out, or pass "
            "--overwrite (overwrite=True) to replace them"
        )
    for path in found:
        path.unlink(missing_ok=True)
    if out / "results.json" in found:
        for name in _SUMMARY_FILES:
            (out / name).unlink(missing_ok=True)
    log.info("red team: removed %d result file(s) of another model from %s (overwrite)", len(found), out)


def _load_finished(path: Path, config_hash: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("red team: ignoring unreadable run file %s (%s); running it again", path, err)
        return None
    if record.get("config_hash") != config_hash or record.get("version") != RESULT_VERSION:
        log.info("red team: %s was written for another configuration; running it again", path.name)
        return None
    return record


# ------------------------------------------------------------------------------------------ result
@dataclass
class RedTeamResult:
    """What :func:`run_redteam` returns (everything is also on disk under ``out_dir``).

    Attributes:
        suite: the suite as run (scaled, seeds and data overrides applied).
        runs: every run record (attack, seed, before, after, trajectory, config, ...), in suite order.
        aggregate: :func:`tar_lightning.evaluation.aggregate.aggregate` of the runs.
        out_dir: the output folder.
        files: name -> path of results.json, results.csv, report.md and the plots.
        computed: keys (``<attack>__seed<k>``) of the runs executed by this call (the others were resumed).
    """

    suite: Suite
    runs: list[dict]
    aggregate: dict
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)

    def run(self, attack: str, seed: int) -> dict:
        for r in self.runs:
            if r["attack"] == attack and r["seed"] == seed:
                return r
        raise KeyError(f"no run of attack {attack!r} with seed {seed}")


# ------------------------------------------------------------------------------------------ parallel
_WORKER: dict[str, Any] = {}


def _worker_init(devices, n_workers, model_arg, tokenizer, suite, evaluator, work_dir) -> None:
    device = devices.get()
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    handle = _ModelHandle(model_arg, tokenizer, device, Path(work_dir))
    data = _DataCache(suite.data, handle.tokenizer, suite.seq_len)
    _WORKER["runner"] = _Runner(suite, handle, evaluator or build_evaluator(suite), data, progress=False)


def _worker_execute(task: _Task) -> dict:
    record = _WORKER["runner"].execute(task)
    _atomic_write(task.path, _json(record))
    return record


def _run_parallel(tasks, devices, model_arg, tokenizer, suite, evaluator, work_dir, progress) -> list[dict]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    for d in devices:
        queue.put(d)
    bar = _bar(len(tasks), f"red team {suite.name}", progress, unit="run")
    results = {}
    try:
        with ProcessPoolExecutor(
            max_workers=len(devices),
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(queue, len(devices), model_arg, tokenizer, suite, evaluator, str(work_dir)),
        ) as pool:
            futures = {pool.submit(_worker_execute, t): t.key for t in tasks}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        manager.shutdown()
    return [results[t.key] for t in tasks]


# ------------------------------------------------------------------------------------------ entry
def _devices(device: Optional[str], devices: Optional[Sequence[str]]) -> list[str]:
    if devices:
        return [str(d) for d in devices]
    if device is not None:
        return [str(device)]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 1:
        return [f"cuda:{i}" for i in range(n)]
    return ["cuda:0"] if n == 1 else ["cpu"]


def run_redteam(
    model: Union[str, os.PathLike, ModelSource, nn.Module],
    suite: Union[Suite, str, os.PathLike],
    *,
    out_dir: Union[str, os.PathLike],
    tokenizer: Any = None,
    scale: float = 1.0,
    seeds: Union[None, int, Sequence[int]] = None,
    attacks: Optional[Sequence[str]] = None,
    data: Optional[Mapping[str, Any]] = None,
    max_steps: Optional[int] = None,
    evaluator: Optional[Evaluator] = None,
    device: Optional[str] = None,
    devices: Optional[Sequence[str]] = None,
    resume: bool = True,
    progress: bool = True,
    report: bool = True,
    overwrite: bool = False,
    trust_callable: bool = False,
) -> RedTeamResult:
    """Runs every attack × seed of a suite on fresh copies of ``model`` and writes results and a report.

    Args:
        model: a model source (folder, hub id, ``.gguf``, alias, ``tiny``), a :class:`ModelSource`, or a
            module (never modified; copied per run) — a module needs ``tokenizer``.
        suite: a :class:`Suite`, a suite file, or a shipped suite name (``durability`` ...).
        out_dir: output folder (created). Run files go to ``out_dir/runs``.
        tokenizer: the tokenizer (default: the source's).
        scale: shrinks steps, warmup, eval cadence and batch sizes (:meth:`Suite.scaled`).
        seeds: seeds per attack: a count or a list, overriding the suite's.
        attacks: run only these attack ids.
        data: data regime overrides, regime -> path / DataSource fields / DataSource.
        max_steps: cap on every attack's steps (after scaling).
        evaluator: ``evaluator(model, tokenizer) -> {metric: value}`` with at least the suite's safety and
            capability metrics (default: :func:`build_evaluator`). If it accepts ``only=``, evaluations during
            attacks ask for ``evaluation.during`` only. With several devices it must be picklable.
        device: the device of every run (default: ``cuda`` when available, else ``cpu``).
        devices: run concurrently, one process per device (default: every CUDA device when there are
            several). The model is then loaded in each process (a module is exported to a folder first).
        resume: reuse finished runs from ``out_dir/runs`` whose configuration hash matches.
        progress: show progress bars (attack, seed, step).
        report: write report.md and the PNG plots (results.json / results.csv are always written).
        overwrite: replace results of another model found in ``out_dir`` (without it they are refused with a
            :class:`ConfigError`; results of the same model are always kept and resumed).
        trust_callable: run the suite's ``kind: callable`` metrics, which import and call the function the
            suite file names (CLI: ``--trust-callable-metrics``); without it such a suite is refused.

    Returns:
        The :class:`RedTeamResult`.

    Raises:
        ConfigError: a bad suite, attack id, data override, scale, or an evaluator without the required
            metrics; a ``callable`` metric without ``trust_callable``; ``out_dir`` holds results of another
            model (without ``overwrite``).
        ModelLoadError: the model source cannot be loaded.
        DataError: a data regime cannot be read.
    """
    out = Path(os.path.expanduser(os.fspath(out_dir))).absolute()
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    if attacks:
        suite = suite.select(attacks)
    if seeds is not None:
        suite = suite.with_seeds(seeds)
    if data:
        suite = suite.with_data(data)
    if scale != 1.0 or max_steps is not None:
        suite = suite.scaled(scale, max_steps=max_steps)
    if evaluator is None:  # before anything is written or loaded: an untrusted callable metric is refused here
        evaluator = build_evaluator(suite, trust_callable=trust_callable)
    device_list = _devices(device, devices)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    handle = _ModelHandle(model, tokenizer, device_list[0], out)
    try:
        _claim_out_dir(out, handle.identity, overwrite)
        data_cache = _DataCache(suite.data, handle.tokenizer, suite.seq_len)
        base_config = {
            "version": RESULT_VERSION,
            "model": handle.identity,
            "suite": suite.name,
            "suite_seed": suite.seed,
            "seq_len": suite.seq_len,
            "evaluation": suite.evaluation.to_dict(),
            "evaluator": _evaluator_id(evaluator),
        }
        # The regimes the evaluation reads (a changed attack regime only invalidates the attacks using it).
        read = {m.data for m in suite.evaluation.metrics.values() if isinstance(m.data, str)}
        eval_regimes = {k: dataclasses.asdict(v) for k, v in sorted(suite.data.items()) if k in read}
        tasks = []
        for attack in suite.attacks:
            n_records = len(data_cache.pool(attack.adversary.data)) if attack.epochs is not None else None
            resolved = attack.resolve(n_records, suite.eval_every)
            used = set(attack.streams)
            regimes = {
                name: dataclasses.asdict(src) for name, src in sorted(suite.data.items()) if name in used
            }
            for seed in suite.seeds_of(attack):
                config = dict(
                    base_config,
                    attack=resolved.to_dict(),
                    attack_id=attack.id,
                    seed=seed,
                    data=regimes,
                    eval_data=eval_regimes,
                )
                rs = run_seed(suite.seed, attack.id, seed)
                path = out / "runs" / f"{attack.id}__seed{seed}.json"
                tasks.append(_Task(attack, seed, resolved, rs, _hash(config), config, path))

        records: dict[str, dict] = {}
        todo = []
        for task in tasks:
            done = _load_finished(task.path, task.config_hash) if resume else None
            if done is not None:
                records[task.key] = done
            else:
                todo.append(task)
        if todo and len(device_list) > 1:
            model_arg = handle.source if handle.source is not None else handle.folder()
            for record, task in zip(
                _run_parallel(
                    todo, device_list, model_arg, handle.tokenizer, suite, evaluator, out, progress
                ),
                todo,
                strict=True,
            ):
                records[task.key] = record
        elif todo:
            runner = _Runner(suite, handle, evaluator, data_cache, progress)
            bar = _bar(len(tasks), f"red team {suite.name}", progress, unit="run")
            if bar is not None:
                bar.update(len(tasks) - len(todo))
            try:
                for task in todo:
                    record = runner.execute(task, position=1)
                    _atomic_write(task.path, _json(record))
                    records[task.key] = record
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
    finally:
        handle.close()

    runs = [records[t.key] for t in tasks]
    spec = suite.evaluation
    aggregate = agg.aggregate(
        runs,
        safety=spec.safety.to_dict(),
        capability=spec.capability.to_dict(),
        capability_floor=spec.capability_floor,
        order=suite.ids,
    )
    result = RedTeamResult(
        suite=suite, runs=runs, aggregate=aggregate, out_dir=out, computed=[t.key for t in todo]
    )
    from tar_lightning.evaluation import report as report_mod

    summary = {
        "suite": suite.to_dict(),
        "model": handle.identity,
        "evaluator": _evaluator_id(evaluator),
        "devices": device_list,
        "wall_time_s": time.perf_counter() - started,
    }
    result.files = report_mod.write_results(result, summary, plots=report, markdown=report)
    return result
