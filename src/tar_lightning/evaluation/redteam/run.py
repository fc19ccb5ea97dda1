"""The red team's entry point: :func:`run_redteam`, every attack × seed of a suite, then the results files.

For every attack × seed (a *run*) :func:`run_redteam`

1. takes a fresh copy of the model (a deep copy of a base kept where it was loaded; a 4-bit/8-bit reload from
   a folder for QLoRA attacks),
2. seeds every random choice from ``(suite seed, attack id, seed)``,
3. evaluates before the attack, every ``eval_every`` steps during it and after it,
4. attacks with :func:`~tar_lightning.adversaries.attack.run_attack` around
   :class:`~tar_lightning.adversaries.AdversaryRun` — the runner TAR's inner loop uses, so a test-time attack and
   a train-time attack with the same configuration are the same code — on seeded, shuffled batches of the
   attack's data regime (retain→forget attacks switch streams at ``switch.fraction`` of the steps); LoRA
   adapters are merged before the final evaluation,
5. writes the run's result atomically to ``out_dir/runs/<attack>__seed<k>.json`` (a ``sweep:`` attack also keeps
   its Optuna study in ``out_dir/runs/<attack>__seed<k>.sweep.db``, :mod:`tar_lightning.evaluation.redteam.sweep`).

Finished runs whose file records the same configuration hash are not run again (resume). At the end the
results are aggregated (:mod:`tar_lightning.evaluation.aggregate`) and ``results.json``, ``results.csv``,
``report.md`` and PNG plots are written (:mod:`tar_lightning.evaluation.report`, which this module calls and
which imports nothing of it). Reports hold scores only, never generated text.

With several CUDA devices the runs are spread over them, one process per device.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from tar_lightning.adversaries.runner import check_adversaries
from tar_lightning.common import config_hash
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation import aggregate as agg

# the module object (not its names): works whichever of report and this package Python imports first
from tar_lightning.evaluation import report as report_files
from tar_lightning.evaluation.redteam.batches import DataCache, run_seed
from tar_lightning.evaluation.redteam.handle import ModelHandle
from tar_lightning.evaluation.redteam.io import claim_out_dir, json_text, load_finished, write_text
from tar_lightning.evaluation.redteam.metrics import Evaluator, build_evaluator, evaluator_id
from tar_lightning.evaluation.redteam.parallel import run_parallel
from tar_lightning.evaluation.redteam.result import RESULT_VERSION, RedTeamResult
from tar_lightning.evaluation.redteam.runner import AttackRunner, RunTask, run_bar
from tar_lightning.evaluation.redteam.sweep import require_optuna
from tar_lightning.evaluation.suite import Suite, load_suite
from tar_lightning.models import ModelSource
from tar_lightning.schema import positive_int_or_none

__all__ = ["run_redteam"]


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
    micro_batch_size: Optional[int] = None,
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
        resume: reuse finished runs from ``out_dir/runs`` whose configuration hash matches, and continue the
            stored study of an unfinished sweep (false: sweeps start their study afresh).
        progress: show progress bars (attack, seed, step).
        report: write report.md and the PNG plots (results.json / results.csv are always written).
        overwrite: replace results of another model found in ``out_dir`` (without it they are refused with a
            :class:`ConfigError`; results of the same model are always kept and resumed).
        trust_callable: run the suite's ``kind: callable`` metrics, which import and call the function the
            suite file names (CLI: ``--trust_callable_metrics``); without it such a suite is refused.
        micro_batch_size: run each attack step's batch in parts of at most this many rows and accumulate the
            gradient, weighted by labelled tokens: the same update (up to float rounding) with the activation
            memory of the smaller part (with dropout, e.g. LoRA dropout, each pass draws its own masks: the same
            update in distribution). An execution setting like ``device``: not part of a run's configuration
            hash (finished runs are reused either way); each run file records the value it ran with, and
            ``results.json``'s summary this invocation's.

    Returns:
        The :class:`RedTeamResult`.

    Raises:
        ConfigError: a bad suite, attack id, data override, scale, ``micro_batch_size``, or an evaluator without
            the required metrics; a ``callable`` metric without ``trust_callable``; ``out_dir`` holds results of another
            model (without ``overwrite``).
        ModelLoadError: the model source cannot be loaded.
        DataError: a data regime cannot be read.
    """
    positive_int_or_none(micro_batch_size, "micro_batch_size")
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

    handle = ModelHandle(model, tokenizer, device_list[0], out)
    try:
        claim_out_dir(out, handle.identity, overwrite)
        data_cache = DataCache(suite.data, handle.tokenizer, suite.seq_len)
        base_config = {
            "version": RESULT_VERSION,
            "model": handle.identity,
            "suite": suite.name,
            "suite_seed": suite.seed,
            "seq_len": suite.seq_len,
            "evaluation": suite.evaluation.to_dict(),
            "evaluator": evaluator_id(evaluator),
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
                tasks.append(RunTask(attack, seed, resolved, rs, config_hash(config), config, path, resume))

        records: dict[str, dict] = {}
        todo = []
        for task in tasks:
            done = load_finished(task.path, task.config_hash) if resume else None
            if done is not None:
                records[task.key] = done
            else:
                todo.append(task)
        # before any run: what only the model can tell (LoRA targets, decoder layers), and a missing optuna
        check_adversaries(handle.base, [t.resolved.adversary for t in todo])
        sweeps = sorted({t.attack.id for t in todo if t.resolved.sweep is not None})
        if sweeps:
            try:
                require_optuna()
            except ConfigError as err:
                raise ConfigError(f"{err} (attack{'s' if len(sweeps) > 1 else ''} {', '.join(sweeps)}; or leave "
                                  "them out with --attacks)") from None
        if todo and len(device_list) > 1:
            model_arg = handle.source if handle.source is not None else handle.folder()
            for record, task in zip(
                run_parallel(
                    todo, device_list, model_arg, handle.tokenizer, suite, evaluator, out, progress, micro_batch_size
                ),
                todo,
                strict=True,
            ):
                records[task.key] = record
        elif todo:
            runner = AttackRunner(suite, handle, evaluator, data_cache, progress, micro_batch_size=micro_batch_size)
            bar = run_bar(len(tasks), f"red team {suite.name}", progress, unit="run")
            if bar is not None:
                bar.update(len(tasks) - len(todo))
            try:
                for task in todo:
                    record = runner.execute(task, position=1)
                    write_text(task.path, json_text(record))
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
    summary = {
        "suite": suite.to_dict(),
        "model": handle.identity,
        "evaluator": evaluator_id(evaluator),
        "devices": device_list,
        "micro_batch_size": micro_batch_size,
        "wall_time_s": time.perf_counter() - started,
    }
    result.files = report_files.write_results(result, summary, plots=report, markdown=report)
    return result
