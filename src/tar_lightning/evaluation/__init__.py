"""Evaluation and red-teaming: MCQ accuracy, held-out losses, refusal rates (generation + judges), the
red-team runner, aggregation, reports."""

from tar_lightning.evaluation import aggregate
from tar_lightning.evaluation.heldout import heldout_metrics
from tar_lightning.evaluation.mcq import MCQ_TASKS, MCQItem, MCQResult, evaluate_mcq_task, load_mcq, score_mcq
from tar_lightning.evaluation.redteam import RedTeamResult, SuiteEvaluator, build_evaluator, run_redteam
from tar_lightning.evaluation.refusal import (
    ClassifierJudge,
    RefusalPhraseJudge,
    RefusalResult,
    build_judge,
    evaluate_refusal,
    generate_responses,
    load_prompts,
)
from tar_lightning.evaluation.suite import AttackSpec, Suite, load_suite

__all__ = [
    "MCQ_TASKS",
    "AttackSpec",
    "ClassifierJudge",
    "RefusalPhraseJudge",
    "RefusalResult",
    "build_judge",
    "evaluate_refusal",
    "generate_responses",
    "load_prompts",
    "MCQItem",
    "MCQResult",
    "RedTeamResult",
    "Suite",
    "SuiteEvaluator",
    "aggregate",
    "build_evaluator",
    "evaluate_mcq_task",
    "heldout_metrics",
    "load_mcq",
    "load_suite",
    "run_redteam",
    "score_mcq",
]
