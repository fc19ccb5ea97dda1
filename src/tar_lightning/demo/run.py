"""The demo's entry point: :func:`run_demo` runs the stage pipeline (in this process or on worker processes),
fills the result, checks the targets and writes the report.

``workers: 1`` runs :meth:`~tar_lightning.demo.pipeline.DemoPipeline.run_in_process`; more workers run
:func:`~tar_lightning.demo.workers.run_stages_in_workers`; both give the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Union

from tar_lightning.demo.config import DemoConfig, load_demo_config
from tar_lightning.demo.io import quiet_lightning, torch_threads
from tar_lightning.demo.pipeline import DemoPipeline
from tar_lightning.demo.report import DemoResult, demo_targets, write_results
from tar_lightning.demo.workers import run_stages_in_workers

__all__ = ["run_demo", "run_pipeline"]


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


def run_demo(config: Union[DemoConfig, Mapping, None] = None) -> DemoResult:
    """Runs stages 0–4 (see :mod:`tar_lightning.demo`); finished stages found in ``config.out`` are reused.

    Args:
        config: a :class:`DemoConfig`, a mapping of its fields, or ``None`` (the default YAML).

    Returns:
        The :class:`DemoResult`; ``results.json`` and ``report.md`` are in ``config.out``.
    """
    if config is None:
        config = load_demo_config()
    elif isinstance(config, Mapping):
        config = DemoConfig.from_dict(config)
    with torch_threads(config.threads), quiet_lightning():
        return run_pipeline(DemoPipeline(config))
