"""Runs spread over several devices: one spawned worker process per device, each with its own model copy.

Each worker loads the model (a source, or the folder a module was exported to), tokenizes the suite's data and
executes the runs it is given with an :class:`~tar_lightning.evaluation.redteam.runner.AttackRunner`, writing
each run file itself. The results are the same as those of one process (every run is seeded on its own).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from tar_lightning.evaluation.redteam.batches import DataCache
from tar_lightning.evaluation.redteam.handle import ModelHandle
from tar_lightning.evaluation.redteam.io import json_text, write_text
from tar_lightning.evaluation.redteam.metrics import build_evaluator
from tar_lightning.evaluation.redteam.runner import AttackRunner, RunTask, run_bar

__all__ = ["run_parallel"]

_WORKER: dict[str, Any] = {}


def _worker_init(devices, n_workers, model_arg, tokenizer, suite, evaluator, work_dir, micro_batch_size) -> None:
    device = devices.get()
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    handle = ModelHandle(model_arg, tokenizer, device, Path(work_dir))
    data = DataCache(suite.data, handle.tokenizer, suite.seq_len)
    _WORKER["runner"] = AttackRunner(suite, handle, evaluator or build_evaluator(suite), data, progress=False,
                                     micro_batch_size=micro_batch_size)


def _worker_execute(task: RunTask) -> dict:
    record = _WORKER["runner"].execute(task)
    write_text(task.path, json_text(record))
    return record


def run_parallel(
    tasks, devices, model_arg, tokenizer, suite, evaluator, work_dir, progress, micro_batch_size=None
) -> list[dict]:
    """Executes ``tasks`` on one spawned process per device; returns their records in the order of ``tasks``.

    Args:
        tasks: the :class:`RunTask` s to execute.
        devices: one worker per device.
        model_arg: what each worker loads (a source or a folder; modules are exported first).
        tokenizer: the tokenizer (picklable).
        suite: the suite as run.
        evaluator: the evaluator (picklable), or ``None`` for the suite's default evaluator.
        work_dir: the output folder.
        progress: show a bar of finished runs.
        micro_batch_size: attack steps run their batch in parts of at most this many rows (``None``: whole).
    """
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    for d in devices:
        queue.put(d)
    bar = run_bar(len(tasks), f"red team {suite.name}", progress, unit="run")
    results = {}
    try:
        with ProcessPoolExecutor(
            max_workers=len(devices),
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(queue, len(devices), model_arg, tokenizer, suite, evaluator, str(work_dir), micro_batch_size),
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
