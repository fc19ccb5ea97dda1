"""Executing red-team runs: one attack × seed on a fresh model copy, a bounded random search, or a TPE sweep.

- :class:`RunTask`: one run to execute (attack, seed, resolved configuration, its hash and file);
- :class:`AttackRunner`: what a process needs to execute runs (model handle, data, evaluator, suite); each attack
  goes through :func:`tar_lightning.adversaries.attack.run_attack`, the loop TamperProbe uses as well;
- :func:`sample_trial`: one configuration of a bounded random search;
- :func:`attack_settings`: what an attack actually used (a run record's ``attack_settings``);
- :func:`judge_agreement_record`: a run record's ``judge_agreement`` (refusal metrics with a second judge);
- the utility-bounded TPE sweep (``sweep:``) is :func:`tar_lightning.evaluation.redteam.sweep.run_sweep`, whose
  trials go through :meth:`AttackRunner.attack_once` like every other attack;
- :func:`run_bar`: the progress bar of runs and steps.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from tar_lightning.adversaries.attack import run_attack
from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.adversaries.perturbation import ActivationPerturbation, resolve_layer
from tar_lightning.adversaries.refusal_direction import RefusalDirection
from tar_lightning.adversaries.runner import AdversaryRun
from tar_lightning.common import model_fingerprint
from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.evaluation import aggregate as agg
from tar_lightning.evaluation.progress import progress as progress_bar
from tar_lightning.evaluation.redteam.batches import AttackBatches, DataCache, seeded
from tar_lightning.evaluation.redteam.handle import ModelHandle
from tar_lightning.evaluation.redteam.metrics import (
    Evaluator,
    MetricValues,
    SuiteEvaluator,
    accepts_only,
    evaluation_mode,
)
from tar_lightning.evaluation.redteam.result import (
    NO_OPTIMIZER_METHODS,
    OPTIMIZER_FIELDS,
    RADIUS_LR_METHODS,
    RESULT_VERSION,
)
from tar_lightning.evaluation.redteam.sweep import run_sweep
from tar_lightning.evaluation.suite import AttackSpec, ResolvedAttack, SearchSpace, Suite, trial_adversary
from tar_lightning.models.layers import decoder_layers
from tar_lightning.models.quantized import packed_for_cpu_inference

__all__ = ["AttackRunner", "RunTask", "attack_settings", "judge_agreement_record", "run_bar", "sample_trial"]


@dataclass
class RunTask:
    """One run of a red team: an attack × seed, its resolved configuration, hash and run file.

    ``resume`` false makes a sweep start its study afresh instead of continuing the stored one.
    """

    attack: AttackSpec
    seed: int
    resolved: ResolvedAttack
    run_seed: int
    config_hash: str
    config: dict
    path: Path
    resume: bool = True

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
    return trial_adversary(base, name, lr=lr, steps=steps, method=method, rank=rank, schedule=schedule, warmup=warmup)


def attack_settings(
    adversary: AdversaryConfig,
    *,
    lr: Optional[float],
    steps: int,
    switch_point: Optional[int],
    n_layers: Optional[int] = None,
    perturbation: Optional[ActivationPerturbation] = None,
    ablation: Optional[RefusalDirection] = None,
) -> dict[str, Any]:
    """What an attack actually used: a run record's ``attack_settings`` (JSON values only).

    Every method: ``method``, ``data`` (the stream attacked with) and ``batch_size``.

    - Optimizer methods (``full``, ``lora``, ``embedding``, ``latent``): ``optimizer``, ``lr`` (the learning rate
      drawn for this run), ``schedule``, ``warmup_steps``, ``weight_decay`` and ``steps`` (optimizer steps); ``lora``:
      ``lora_rank``, ``lora_alpha``; ``embedding`` / ``latent``: ``lr_units: "radius"`` (the trained tensor is
      δ / radius, so the LR is in units of the radius), ``epsilon``, ``relative``, ``radius`` (the bound used, fixed
      on the first batch), ``reference_norm`` (the measured mean norm of a relative bound), ``scope`` (embedding)
      or ``layer`` (latent: the 0-based decoder layer perturbed).
    - ``refusal_ablation`` (no optimizer, LR, schedule or optimizer steps): ``harmless`` (the harmless stream),
      ``layer`` (the 0-based decoder layer read), ``position``, ``batches`` read, ``harmless_batches`` /
      ``harmful_batches``, ``harmless_prompts`` / ``harmful_prompts`` (the prompts averaged), and ``unused``: the
      adversary fields it ignores (:data:`~tar_lightning.evaluation.redteam.result.OPTIMIZER_FIELDS`).

    Args:
        adversary: the attack as run.
        lr: the learning rate drawn for the run.
        steps: the run's steps (batches read, for ``refusal_ablation``).
        switch_point: the first step on the adversary's own data (``None``: no switch).
        n_layers: the model's number of decoder layers (resolves a ``latent`` layer of ``null`` / negative).
        perturbation: the run's activation perturbation (``embedding`` / ``latent``), after the attack.
        ablation: the run's refusal direction (``refusal_ablation``), after the attack.
    """
    out: dict[str, Any] = {
        "method": adversary.method,
        "data": adversary.data,
        "batch_size": adversary.batch_size,
    }
    if adversary.method in NO_OPTIMIZER_METHODS:
        spec = adversary.refusal_ablation
        harmless_batches = int(switch_point) if switch_point is not None else 0
        out.update(
            harmless=spec.harmless,
            layer=ablation.layer if ablation is not None else spec.layer,
            position=spec.position,
            batches=int(steps),
            harmless_batches=harmless_batches,
            harmful_batches=int(steps) - harmless_batches,
            harmless_prompts=int(ablation.counts[False]) if ablation is not None else None,
            harmful_prompts=int(ablation.counts[True]) if ablation is not None else None,
            unused=list(OPTIMIZER_FIELDS),
        )
        return out
    out.update(
        optimizer=adversary.optimizer,
        lr=None if lr is None else float(lr),
        schedule=adversary.schedule,
        warmup_steps=adversary.warmup_steps,
        weight_decay=adversary.weight_decay,
        steps=int(steps),
    )
    if adversary.method == "lora":
        out.update(lora_rank=adversary.lora.rank, lora_alpha=adversary.lora.alpha)
    if adversary.method in RADIUS_LR_METHODS:
        spec = adversary.embedding if adversary.method == "embedding" else adversary.latent
        out.update(
            lr_units="radius",
            epsilon=spec.epsilon,
            relative=spec.relative,
            radius=perturbation.radius if perturbation is not None else None,
            reference_norm=perturbation.reference_norm if perturbation is not None else None,
        )
        if adversary.method == "embedding":
            out["scope"] = adversary.embedding.scope
        else:
            layer = adversary.latent.layer
            out["layer"] = resolve_layer(layer, n_layers, "latent.layer") if n_layers is not None else layer
    return out


def judge_agreement_record(before: Mapping, after: Mapping, trajectory: list) -> dict[str, Any]:
    """A run record's ``judge_agreement``: for the refusal metrics with an ``options.second_judge``, what the second
    judge said about the same answers (:class:`~tar_lightning.evaluation.redteam.metrics.MetricValues`), as
    ``{"before": {metric: {...}}, "after": {...}, "during": [[step, {...}], ...]}``, each part only when it holds
    something. Empty without second judges (the record then gets no ``judge_agreement`` at all, as before the key
    existed)."""
    out: dict[str, Any] = {}
    for part, values in (("before", before), ("after", after)):
        found = getattr(values, "judge_agreement", None)
        if found:
            out[part] = found
    during = [[step, values.judge_agreement] for step, values in trajectory[1:-1]
              if getattr(values, "judge_agreement", None)]
    if during:
        out["during"] = during
    return out


def run_bar(total: Optional[int], desc: str, enabled: bool, position: int = 0, unit: str = "step"):
    """A progress bar on a terminal, plain lines in a log file (:func:`~tar_lightning.evaluation.progress.progress`);
    ``None`` when not ``enabled``."""
    return progress_bar(total=total, desc=desc, unit=unit, enabled=enabled, position=position, leave=False)


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


class AttackRunner:
    """Everything one process needs to execute runs: model handle, data, evaluator, suite.

    Args:
        suite: the suite as run.
        handle: the model under attack.
        evaluator: ``evaluator(model, tokenizer[, only=...]) -> {metric: value}``.
        data: the suite's tokenized data regimes.
        progress: show a progress bar per run.
        micro_batch_size: attack steps run their batch in parts of at most this many rows (``None``: whole).
    """

    def __init__(
        self,
        suite: Suite,
        handle: ModelHandle,
        evaluator: Evaluator,
        data: DataCache,
        progress: bool,
        micro_batch_size: Optional[int] = None,
    ) -> None:
        self.suite = suite
        self.micro_batch_size = micro_batch_size
        self.handle = handle
        self.evaluator = evaluator
        self.data = data
        self.progress = progress
        self._only = accepts_only(evaluator)
        spec = suite.evaluation
        self.required = [spec.safety.metric, spec.capability.metric]
        self._before_memo: dict[str, dict[str, float]] = {}

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, optimizer=None, during: bool = False) -> MetricValues:
        """The evaluator's metrics (``evaluation.during`` only when ``during`` and the evaluator takes ``only``), with
        the judge agreement the evaluator reports (:class:`MetricValues`; none for an evaluator of its own)."""
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
        out = MetricValues({str(k): float(v) for k, v in values.items()}, getattr(values, "judge_agreement", None))
        if not during:
            missing = [m for m in self.required if m not in out]
            if missing:
                raise ConfigError(
                    f"the evaluator returned {sorted(out)}, without the suite's safety/capability metric(s) "
                    f"{missing}"
                )
        return out

    def _pre_attack(self, model: nn.Module) -> MetricValues:
        """The pre-attack evaluation; with the default evaluator (deterministic: losses, greedy generation) it is
        computed once per distinct starting weights and reused by the other runs (generation is expensive)."""
        if not isinstance(self.evaluator, SuiteEvaluator):
            return self.evaluate(model)
        key = model_fingerprint(model)
        if key not in self._before_memo:
            self._before_memo[key] = self.evaluate(model)
        return self._before_memo[key].copy()

    def _evaluate_at(self, model: nn.Module, optimizer: Any, stage: str) -> MetricValues:
        """:func:`run_attack`'s evaluator: the (memoised) pre-attack evaluation, ``during`` metrics, the full set."""
        if stage == "before":
            return self._pre_attack(model)
        return self.evaluate(model, optimizer, during=stage == "during")

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
        """Runs one adversary on a fresh model copy; returns before/after/trajectory/losses and what the attack
        used (``attack_settings``, :func:`attack_settings`; ``lr`` is ``None`` for a method without an optimizer),
        and ``judge_agreement`` (:func:`judge_agreement_record`) when a refusal metric has a second judge."""
        steps = int(adversary.steps)
        device = self.handle.device
        with seeded(seed):
            model = self.handle.fresh(adversary)
            quantized = adversary.method == "lora" and adversary.lora.quantize_base is not None
            if before is None:
                before = self._pre_attack(model)
            streams = [adversary.data] + ([adversary.switch.retain_stream] if adversary.switch else [])
            batches = AttackBatches(
                {s: self.data.pool(s) for s in streams},
                int(adversary.batch_size),
                seed,
                self.handle.tokenizer.pad_token_id,
                device=device,
            )

            used: dict[str, Any] = {}

            def start(run: AdversaryRun) -> None:
                used.update(perturbation=run.perturbation, ablation=run.ablation)
                if adversary.method == "latent":
                    used["n_layers"] = len(decoder_layers(run.model))
                if quantized:  # checked after the pre-attack evaluation, whose eval-mode forwards could repack
                    packed = packed_for_cpu_inference(run.model)
                    if packed:
                        raise TARLightningError(
                            f"attack {adversary.name!r}: 4-bit layers {packed[:3]} were repacked for CPU inference; "
                            "training through them gives wrong gradients"
                        )
                _guard_gradients(run, adversary.name)

            # Unmerged adapters compute the same function; a quantized base is not merged because folding the
            # adapters into 4/8-bit weights re-quantizes them.
            outcome = run_attack(
                model,
                adversary,
                batches.next,
                self._evaluate_at,
                seed=seed,
                steps=steps,
                before=before,
                eval_every=eval_every,
                merge_lora=merge_lora and not quantized,
                on_start=start,
                on_step=(lambda done: bar.update(1)) if bar is not None else None,
                micro_batch_size=self.micro_batch_size,
            )
            loss_values = torch.stack(outcome.losses).float().cpu().tolist() if outcome.losses else []
            lr = None if adversary.method in NO_OPTIMIZER_METHODS else outcome.lr  # drawn, never used: not reported
            settings = attack_settings(adversary, lr=lr, steps=steps, switch_point=outcome.switch_point, **used)
            used.clear()  # the ablation holds a layer of the model copy: let the copy go
            del model, batches
        _free_memory(device)
        out = {
            "before": outcome.before,
            "after": outcome.after,
            "trajectory": outcome.trajectory,
            "train_loss": loss_values,
            "lr": lr,
            "switch_point": outcome.switch_point,
            "steps": steps,
            "attack_settings": settings,
        }
        agreement = judge_agreement_record(before, outcome.after, outcome.trajectory)
        if agreement:
            out["judge_agreement"] = agreement
        return out

    def search(self, task: RunTask, bar: Any = None) -> dict[str, Any]:
        """Bounded random search (d08): the most damaging trial that keeps enough capability."""
        space = task.resolved.search
        assert space is not None
        base = task.resolved.adversary
        cap = self.suite.evaluation.capability
        safety = self.suite.evaluation.safety
        with seeded(task.run_seed):
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

    def sweep(self, task: RunTask, bar: Any = None) -> dict[str, Any]:
        """Utility-bounded TPE sweep (w27, d09), resumable from its SQLite study:
        :func:`tar_lightning.evaluation.redteam.sweep.run_sweep`."""
        return run_sweep(self, task, bar)

    def execute(self, task: RunTask, position: int = 0) -> dict[str, Any]:
        """One attack × seed: the run's full result record."""
        resolved = task.resolved
        trials = resolved.search is not None or resolved.sweep is not None
        total = None if trials else resolved.adversary.steps  # trial lengths are drawn later
        bar = run_bar(total, f"{task.attack.id} seed {task.seed}", self.progress, position)
        start = time.perf_counter()
        try:
            if resolved.sweep is not None:
                result = self.sweep(task, bar)
            elif resolved.search is not None:
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
            "micro_batch_size": self.micro_batch_size,
            "wall_time_s": time.perf_counter() - start,
        }
        record.update(result)
        return record
