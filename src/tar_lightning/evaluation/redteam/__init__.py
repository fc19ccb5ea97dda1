"""The red team: every attack of a suite, several seeds each, on fresh copies of one model.

:func:`run_redteam` is the entry point; this package re-exports the public names of its submodules:

- ``batches``: :func:`run_seed`, :func:`seeded`, :class:`AttackBatches`, :class:`DataCache`;
- ``metrics``: :func:`evaluation_mode`, :data:`DEFAULT_METRIC_FNS`, :class:`SuiteEvaluator`,
  :func:`build_evaluator`, :func:`chat_heldout_metrics`;
- ``handle``: :class:`ModelHandle` (the base model, fresh copies, quantized reloads through
  :func:`tar_lightning.models.quantized.load_quantized`);
- ``runner``: :class:`AttackRunner` (one run on one process; each attack through
  :func:`tar_lightning.adversaries.attack.run_attack`), :func:`sample_trial`;
- ``parallel``: :func:`run_parallel`, one worker process per device;
- ``io``: JSON text, configuration hashes, run files, the output folder's ownership;
- ``result``: :class:`RedTeamResult`;
- ``run``: :func:`run_redteam`.

``load_quantized``, ``packed_for_cpu_inference`` (:mod:`tar_lightning.models.quantized`) and
``quiet_hf_progress`` (:mod:`tar_lightning.evaluation.progress`) are re-exported under their old path.
"""

from tar_lightning.evaluation.progress import quiet_hf_progress
from tar_lightning.evaluation.redteam.batches import AttackBatches, DataCache, run_seed, seeded
from tar_lightning.evaluation.redteam.handle import ModelHandle
from tar_lightning.evaluation.redteam.metrics import (
    DEFAULT_METRIC_FNS,
    Evaluator,
    MetricFn,
    SuiteEvaluator,
    build_evaluator,
    chat_heldout_metrics,
    evaluation_mode,
)
from tar_lightning.evaluation.redteam.result import RESULT_VERSION, RedTeamResult
from tar_lightning.evaluation.redteam.run import run_redteam
from tar_lightning.evaluation.redteam.runner import AttackRunner, RunTask, sample_trial
from tar_lightning.models.quantized import load_quantized, packed_for_cpu_inference

__all__ = [
    "DEFAULT_METRIC_FNS",
    "RESULT_VERSION",
    "AttackBatches",
    "AttackRunner",
    "DataCache",
    "Evaluator",
    "MetricFn",
    "ModelHandle",
    "RedTeamResult",
    "RunTask",
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
    "seeded",
]
