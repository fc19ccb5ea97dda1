"""Named MCQ tasks (WMDP, MMLU and its subjects): :class:`MCQTask`, :data:`MCQ_TASKS`, the data root
(``$TAR_LIGHTNING_DATA``) and where a task's questions are read from (:func:`resolve_task`, :func:`load_task_items`).
"""

from __future__ import annotations

import difflib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from tar_lightning.errors import ConfigError, DataError
from tar_lightning.evaluation.mcq.items import MCQItem, load_mcq

__all__ = [
    "DATA_ROOT_ENV",
    "MCQ_TASKS",
    "MMLU_SUBJECTS",
    "MCQTask",
    "get_task",
    "load_task_items",
    "resolve_task",
]

#: The environment variable naming the default data root.
DATA_ROOT_ENV = "TAR_LIGHTNING_DATA"


#: The 57 MMLU subjects (file ``mmlu/test/<subject>_test.csv``, hub config of ``cais/mmlu``).
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip


@dataclass(frozen=True)
class MCQTask:
    """A named multiple-choice benchmark and where its questions live.

    Attributes:
        name: the task name (as lm-eval names it: ``wmdp_bio``, ``mmlu``, ``mmlu_anatomy``).
        local_path: the file or folder relative to a data root (see :func:`resolve_task` for the layout).
        hub_id: the Hugging Face dataset used when no data root is given.
        hub_name: its config name.
        subject: the subject written into every prompt; ``None`` uses each question's own subject (MMLU "all").
    """

    name: str
    local_path: str
    hub_id: str
    hub_name: Optional[str]
    subject: Optional[str]


def _build_tasks() -> dict[str, MCQTask]:
    tasks = {
        f"wmdp_{short}": MCQTask(
            f"wmdp_{short}", f"wmdp/wmdp-{short}-questions.json", "cais/wmdp", f"wmdp-{short}", s
        )
        for short, s in (("bio", "biology"), ("chem", "chemistry"), ("cyber", "cybersecurity"))
    }
    tasks["mmlu"] = MCQTask("mmlu", "mmlu/test", "cais/mmlu", "all", None)
    for s in MMLU_SUBJECTS:
        tasks[f"mmlu_{s}"] = MCQTask(f"mmlu_{s}", f"mmlu/test/{s}_test.csv", "cais/mmlu", s, s)
    return tasks


#: Every known task by name: ``wmdp_bio``, ``wmdp_chem``, ``wmdp_cyber``, ``mmlu`` and ``mmlu_<subject>``.
MCQ_TASKS: dict[str, MCQTask] = _build_tasks()


def _data_root(data_root: Union[str, os.PathLike, None]) -> Optional[Path]:
    if data_root is None:
        env = os.environ.get(DATA_ROOT_ENV, "").strip()
        if not env:
            return None
        data_root = env
    root = Path(os.path.expanduser(os.fspath(data_root)))
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder (expected a folder holding wmdp/wmdp-bio-questions.json, "
                        "mmlu/test/<subject>_test.csv ...)")
    return root


def get_task(task: Union[str, MCQTask]) -> MCQTask:
    """The :class:`MCQTask` of a name (``wmdp_bio``, ``mmlu``, ``mmlu_anatomy``; ``-`` and case are ignored).

    Raises:
        ConfigError: unknown task name (the message lists the valid ones).
    """
    if isinstance(task, MCQTask):
        return task
    key = task.strip().lower().replace("-", "_") if isinstance(task, str) else None
    if key not in MCQ_TASKS:
        close = difflib.get_close_matches(key or "", list(MCQ_TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown MCQ task {task!r}{hint}; expected one of {[k for k in MCQ_TASKS if not k.startswith('mmlu_')]} "
            f"or mmlu_<subject> ({len(MMLU_SUBJECTS)} subjects: {', '.join(MMLU_SUBJECTS[:3])}, ...; "
            "tar_lightning.evaluation.mcq.MMLU_SUBJECTS lists them)"
        )
    return MCQ_TASKS[key]


def resolve_task(
    task: Union[str, MCQTask], data_root: Union[str, os.PathLike, None] = None
) -> tuple[MCQTask, str]:
    """Find a task and where to read it: ``(task, local path or hub id)``.

    The data root is ``data_root``, else the environment variable ``TAR_LIGHTNING_DATA``; with neither, the
    hub id (``cais/wmdp``, ``cais/mmlu``; note the hub WMDP is a later, filtered version with fewer questions than
    the original release, 1,520 / 412 / 2,225 questions, that local copies usually hold).

    Raises:
        ConfigError: unknown task name (the message lists the valid ones).
        DataError: the data root is not a folder, or lacks the task's file.
    """
    task = get_task(task)
    root = _data_root(data_root)
    if root is None:
        return task, task.hub_id
    path = root / task.local_path
    if not path.exists():
        raise DataError(
            f"task {task.name}: expected {path} under the data root {root} (a folder laid out as "
            "wmdp/wmdp-bio-questions.json, mmlu/test/<subject>_test.csv)"
        )
    return task, str(path)


def load_task_items(
    task: Union[str, MCQTask], data_root: Union[str, os.PathLike, None] = None, limit: Optional[int] = None
) -> tuple[MCQTask, list[MCQItem], str]:
    """Load a task's questions; returns ``(task, items, where they came from)``. See :func:`resolve_task`.

    ``limit`` keeps the first ``limit`` questions; for the multi-subject ``mmlu`` task the first ``limit`` of EACH
    subject, as lm-eval applies ``--limit`` to every MMLU subtask.
    """
    spec, where = resolve_task(task, data_root)
    per_subject = spec.subject is None and limit is not None
    load_limit = None if per_subject else limit
    if where == spec.hub_id:
        items = load_mcq(where, limit=load_limit, name=spec.hub_name, split="test")
    else:
        items = load_mcq(where, limit=load_limit)
    if per_subject:
        seen: Counter = Counter()
        kept = []
        for item in items:
            seen[item.subject] += 1
            if seen[item.subject] <= limit:
                kept.append(item)
        items = kept
    if spec.subject is not None:
        for item in items:
            item.subject = spec.subject
    return spec, items, where
