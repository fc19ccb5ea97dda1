"""The demo's entry point: :func:`run_demo` runs the stage pipeline (in this process or on worker processes),
fills the result, checks the targets and writes the report.

``workers: 1`` runs :meth:`~tar_lightning.demo.pipeline.DemoPipeline.run_in_process`; more workers run
:func:`~tar_lightning.demo.workers.run_stages_in_workers`; both give the same numbers.

With ``seeds`` (``--seeds 0,1,2``) :func:`run_seeds` runs the whole demo once per training seed into
``<out>/seed<N>/`` (:func:`seed_config`; each folder is what ``--seed N --out <out>/seed<N>`` writes, and keeps
its own stage cache) and writes the aggregate (:func:`~tar_lightning.demo.seeds.aggregate_seeds`) into ``out``.
Running the same command again reuses every finished stage of every seed, so it only aggregates;
:func:`aggregate_seed_folders` aggregates existing folders without loading or running anything.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from tar_lightning.demo.config import DemoConfig, load_demo_config
from tar_lightning.demo.io import quiet_lightning, read_json, torch_threads
from tar_lightning.demo.pipeline import DemoPipeline
from tar_lightning.demo.report import DemoResult, SeedsResult, demo_targets, write_results, write_seed_results
from tar_lightning.demo.seeds import aggregate_seeds
from tar_lightning.demo.workers import run_stages_in_workers
from tar_lightning.errors import ConfigError

__all__ = ["aggregate_seed_folders", "run_demo", "run_pipeline", "run_seeds", "seed_config", "seed_folder"]


def run_pipeline(pipeline: DemoPipeline) -> DemoResult:
    """Runs every stage of ``pipeline`` (finished ones are loaded), collects the red-team cells, checks the
    targets and writes ``results.json``, ``report.md`` and the plots; returns ``pipeline.result``."""
    start = time.perf_counter()
    pipeline.out.mkdir(parents=True, exist_ok=True)
    if pipeline.cfg.workers > 1:
        reds = run_stages_in_workers(pipeline)

        def model_of(defense: str) -> tuple[Any, Any]:
            return pipeline.load_stage(pipeline.defenses()[defense])
    else:
        defenses, reds = pipeline.run_in_process()
        model_of = defenses.__getitem__
    pipeline.collect(reds, model_of)
    pipeline.result.targets = demo_targets(pipeline.result)
    pipeline.result.wall_time_s = time.perf_counter() - start
    write_results(pipeline.result)
    return pipeline.result


def seed_folder(config: DemoConfig, seed: Union[int, str]) -> Path:
    """``<config.out>/seed<seed>``: where the run of one training seed goes."""
    return Path(os.path.expanduser(config.out)) / f"seed{seed}"


def seed_config(config: DemoConfig, seed: int) -> DemoConfig:
    """The single-seed configuration of training seed ``seed``: ``config`` with ``seed`` set, ``seeds`` cleared
    and ``out`` = :func:`seed_folder` (the run ``--seed <seed> --out <out>/seed<seed>`` does)."""
    return dataclasses.replace(config, seed=seed, seeds=None, out=str(seed_folder(config, seed)))


def _check_seeds(config: DemoConfig) -> list[int]:
    if not config.seeds:
        raise ConfigError(f"seeds must be a non-empty list of training seeds for a run over seeds, got {config.seeds!r}")
    return list(config.seeds)


def _seeds_result(config: DemoConfig) -> SeedsResult:
    """The :class:`SeedsResult` of the per-seed ``results.json`` files (aggregated, not written)."""
    results = []
    for seed in _check_seeds(config):
        path = seed_folder(config, seed) / "results.json"
        data = read_json(path)
        if data is None:
            raise ConfigError(f"seeds: {path} is missing or unreadable; run the demo with --seeds first")
        results.append(data)
    return SeedsResult(config=config, out_dir=Path(os.path.expanduser(config.out)).absolute(),
                       aggregate=aggregate_seeds(results))


def aggregate_seed_folders(config: DemoConfig) -> SeedsResult:
    """Aggregates the finished runs in ``<out>/seed<N>/results.json`` (N in ``config.seeds``) into ``out``
    (``results.json``, ``report.md``, plot) without running or loading anything.

    Raises:
        ConfigError: a seed folder without ``results.json`` (naming it), or runs of different configurations.
    """
    start = time.perf_counter()
    res = _seeds_result(config)
    res.wall_time_s = time.perf_counter() - start
    write_seed_results(res)
    return res


def run_seeds(config: DemoConfig) -> SeedsResult:
    """Runs the demo once per training seed of ``config.seeds`` into ``<out>/seed<N>/`` (:func:`seed_config`;
    finished stages there are reused), then aggregates them as :func:`aggregate_seed_folders` does.
    ``config.seed`` is not used (``seeds`` wins; a line says so)."""
    seeds = _check_seeds(config)
    start = time.perf_counter()
    print(f"[demo] training seeds {seeds}: one full run per seed into {seed_folder(config, '<N>')} "
          f"(`seeds` wins: `seed` {config.seed} is not used)", flush=True)
    runs = {}
    for i, seed in enumerate(seeds):
        print(f"[demo] training seed {seed} ({i + 1}/{len(seeds)}): {seed_folder(config, seed)}", flush=True)
        runs[seed] = run_pipeline(DemoPipeline(seed_config(config, seed)))
    res = _seeds_result(config)
    res.runs = runs
    res.wall_time_s = time.perf_counter() - start
    write_seed_results(res)
    return res


def run_demo(config: Union[DemoConfig, Mapping, None] = None) -> Union[DemoResult, SeedsResult]:
    """Runs stages 0–4 (see :mod:`tar_lightning.demo`); finished stages found in ``config.out`` are reused.

    Args:
        config: a :class:`DemoConfig`, a mapping of its fields, or ``None`` (the default YAML).

    Returns:
        The :class:`DemoResult`; ``results.json`` and ``report.md`` are in ``config.out``. With ``config.seeds``:
        the :class:`SeedsResult` of :func:`run_seeds` (one run per training seed in ``<out>/seed<N>``, the
        aggregate in ``out``).
    """
    if config is None:
        config = load_demo_config()
    elif isinstance(config, Mapping):
        config = DemoConfig.from_dict(config)
    with torch_threads(config.threads), quiet_lightning():
        if config.seeds is not None:
            return run_seeds(config)
        return run_pipeline(DemoPipeline(config))
