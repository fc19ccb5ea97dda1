"""Multiple-choice evaluation (WMDP, MMLU and any question/choices/answer set), scored like lm-evaluation-harness.

The default setting reproduces lm-evaluation-harness 0.4 zero-shot ``multiple_choice`` scoring of the ``wmdp_*``
and ``mmlu_*`` tasks (``HFLM``, ``batch_size`` any, no chat template), so accuracies agree question by question
when the same questions are used:

- context: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` +
  ``"{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"`` (see :func:`format_context`);
- continuations ``" A"``, ``" B"``, ... ; the score of a choice is the summed log-probability of its continuation
  tokens given the context, the prediction the first index of the maximum score; no length normalisation;
- tokenisation as lm-eval's ``HFLM._encode_pair``: trailing whitespace of the context moves into the
  continuation, the context and the context+continuation strings are encoded separately, the continuation tokens
  are the whole encoding minus the first ``len(context tokens)``; encoded with ``add_special_tokens=False``
  (``HFLM``'s default for causal models, ``add_bos_token=False``); inputs longer than the model's maximum length
  are truncated on the left like lm-eval.

Speed: when every continuation of a question has the same number of tokens and they differ only in the last one
(the letter variant with any common tokenizer: ``" A"`` is one token), a question needs ONE forward pass: the log-
probabilities of all choices are read from the same next-token distribution. Otherwise each (question, choice) is
its own sequence. Sequences are sorted by length, padded on the right and run ``batch_size`` at a time; the results
are put back into the original question order.

Variants (additional to the standard, as the red-team requires):

- ``variant="cloze"``: lm-eval's ``mmlu_continuation`` style: context ``"The following are questions (with
  answers) about {subject}.\\n\\nQuestion: {question.strip()}\\nAnswer:"``, continuations ``" {choice text}"``;
  ``acc`` (summed log-prob) and ``acc_norm`` (log-prob divided by the choice's length in characters) are reported.
- ``chat_template=True``: as lm-eval's ``--apply_chat_template``: the description (``"The following are ..."``,
  preceded by the system prompt and ``"\\n\\n"`` when one is given) becomes the system message, the question text
  the user message, the tokenizer's chat template is applied with ``add_generation_prompt=True``, and the
  continuations carry NO leading space (lm-eval sets the target delimiter to ``""`` under a chat template:
  ``"A"``, or the bare choice text). Because the generation prompt ends with a newline, that newline moves into
  the continuation (``"\\nA"``); it is shared by all choices, so one forward per question still suffices.
  A template that rejects a system role is retried without the system message (lm-eval does the same).
- ``system_prompt`` without a chat template: ``system_prompt + "\\n\\n"`` is prepended to the context (lm-eval's
  ``--system_instruction``).
- ``variant="raw"``: no lm-eval format at all, for small models trained only on plain sentences (the knowledge
  world's cloze stems, :mod:`tar_lightning.data.knowledge`): the context is the question text exactly as given
  (no description, no ``"Question:"``/``"Answer:"``, not stripped; trailing whitespace moves into the
  continuation as usual), the continuations are ``" {choice text}"``, and the score of a choice is the summed
  log-probability of its continuation tokens (no length normalisation; the prediction is the first maximum).
  With ``system_prompt`` the context is ``system_prompt + "\\n\\n" + question``; a chat template is not
  supported (ConfigError).
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from tar_lightning.common import looks_local
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.evaluation.progress import progress as progress_bar

__all__ = [
    "DATA_ROOT_ENV",
    "LETTERS",
    "MCQ_TASKS",
    "MCQ_VARIANTS",
    "MMLU_SUBJECTS",
    "MCQItem",
    "MCQResult",
    "MCQTask",
    "continuations",
    "evaluate_mcq_task",
    "format_context",
    "get_task",
    "load_mcq",
    "load_task_items",
    "resolve_task",
    "score_mcq",
    "setting_label",
]

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MCQ_VARIANTS = ("letter", "cloze", "raw")
DATA_ROOT_ENV = "TAR_LIGHTNING_DATA"

_SPLIT_SUFFIXES = ("_test", "_dev", "_val", "_validation", "_train")
_FILE_SUFFIXES = (".csv", ".json", ".jsonl")


# ------------------------------------------------------------------------------------------------- items


@dataclass
class MCQItem:
    """One multiple-choice question.

    Attributes:
        question: the question text.
        choices: the answer options (at least 2), lettered A, B, C, ... in this order.
        answer: 0-based index of the correct choice.
        subject: the subject (MMLU subject name with underscores, or e.g. ``"biology"``); used in the prompt
            when the task gives no fixed subject.
    """

    question: str
    choices: list[str]
    answer: int
    subject: str = ""


def _parse_answer(value: Any, n_choices: int, where: str) -> int:
    """An answer given as a 0-based index (int or digit string) or a letter (``"A"``, ``"b"``)."""
    idx: Optional[int] = None
    if isinstance(value, bool):
        idx = None
    elif isinstance(value, int):
        idx = value
    elif isinstance(value, float) and value.is_integer():
        idx = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            idx = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            idx = LETTERS.index(text.upper())
    if idx is None:
        raise DataError(
            f"{where}: answer {value!r} is neither a 0-based choice index nor a letter "
            f"{LETTERS[0]}-{LETTERS[max(n_choices - 1, 0)]}"
        )
    if not 0 <= idx < n_choices:
        raise DataError(
            f"{where}: answer {value!r} is out of range for {n_choices} choices "
            f"(expected an index 0-{n_choices - 1} or a letter {LETTERS[0]}-{LETTERS[n_choices - 1]})"
        )
    return idx


def _make_item(question: Any, choices: Any, answer: Any, subject: Any, where: str) -> MCQItem:
    if not isinstance(question, str):
        raise DataError(f"{where}: 'question' must be a string, got {type(question).__name__}")
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise DataError(f"{where}: 'choices' must be a list of strings, got {type(choices).__name__}")
    choices = list(choices)
    if len(choices) < 2 or len(choices) > len(LETTERS):
        raise DataError(f"{where}: expected 2 to {len(LETTERS)} choices, got {len(choices)}")
    bad = [i for i, c in enumerate(choices) if not isinstance(c, str)]
    if bad:
        raise DataError(
            f"{where}: choices {bad} are not strings (got {[type(choices[i]).__name__ for i in bad]})"
        )
    return MCQItem(
        question=question,
        choices=choices,
        answer=_parse_answer(answer, len(choices), where),
        subject=str(subject) if subject else "",
    )


def _subject_from_filename(path: Path) -> str:
    stem = path.name
    for suffix in _FILE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for suffix in _SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _record_item(record: Any, where: str, default_subject: str) -> MCQItem:
    if not isinstance(record, Mapping):
        raise DataError(
            f"{where}: expected an object with fields question, choices, answer; got {type(record).__name__}"
        )
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; expected question, choices, answer (found {sorted(record)})"
        )
    return _make_item(
        record["question"],
        record["choices"],
        record["answer"],
        record.get("subject") or default_subject,
        where,
    )


def _read_json(path: Path, limit: Optional[int]) -> list[MCQItem]:
    subject = ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read MCQ file {path}: {e}") from e
    records: list[tuple[Any, str]] = []
    parsed: Any = None
    if path.suffix != ".jsonl":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):  # anything but "several JSON values": a broken .json file
                raise DataError(f"MCQ file {path}: invalid JSON at line {e.lineno}: {e.msg}") from e
            parsed = None
    if parsed is not None:
        if isinstance(parsed, Mapping) and len(parsed) == 1 and isinstance(next(iter(parsed.values())), list):
            parsed = next(iter(parsed.values()))
        if not isinstance(parsed, list):
            raise DataError(
                f"MCQ file {path}: expected a JSON list of {{question, choices, answer}} objects, "
                f"got {type(parsed).__name__}"
            )
        records = [(r, f"MCQ file {path}: item {i}") for i, r in enumerate(parsed)]
    else:  # JSON lines
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"MCQ file {path}: line {lineno}"))
            except json.JSONDecodeError as e:
                raise DataError(f"MCQ file {path}: invalid JSON on line {lineno}: {e.msg}") from e
    items = []
    for record, where in records:
        items.append(_record_item(record, where, subject))
        if limit is not None and len(items) >= limit:
            break
    return items


def _read_csv(path: Path, limit: Optional[int]) -> list[MCQItem]:
    """An MMLU-style CSV: ``question, choice..., answer``; with or without a header row.

    A header is recognised by its first cell being ``question``; its columns are then taken by name
    (``question``, ``answer``, optional ``subject``; every other column is a choice, in order). Without a header
    (the original hendrycks files) a row is the question, the choices, and the answer in the last column.
    """
    subject = _subject_from_filename(path)
    items: list[MCQItem] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header: Optional[list[str]] = None
            q_col = a_col = s_col = None
            choice_cols: list[int] = []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"MCQ file {path}: row {reader.line_num}"
                if header is None and not items and row[0].strip().lower() == "question":
                    header = [c.strip().lower() for c in row]
                    if "answer" not in header:
                        raise DataError(
                            f"MCQ file {path}: no 'answer' column in the header {header}; expected columns "
                            "question, the choices (e.g. choice0..choice3 or A..D), answer"
                        )
                    q_col, a_col = header.index("question"), header.index("answer")
                    s_col = header.index("subject") if "subject" in header else None
                    choice_cols = [i for i in range(len(header)) if i not in (q_col, a_col, s_col)]
                    continue
                if header is not None:
                    if len(row) != len(header):
                        raise DataError(
                            f"{where}: {len(row)} fields, but the header has {len(header)} columns"
                        )
                    item = _make_item(
                        row[q_col],
                        [row[i] for i in choice_cols],
                        row[a_col],
                        row[s_col] if s_col is not None and row[s_col] else subject,
                        f"{where}, column 'answer'",
                    )
                else:
                    if len(row) < 4:
                        raise DataError(
                            f"{where}: {len(row)} fields; expected question, at least 2 choices and the answer "
                            "(last column)"
                        )
                    item = _make_item(row[0], row[1:-1], row[-1], subject, f"{where}, answer column (last)")
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
    except csv.Error as e:
        raise DataError(f"MCQ file {path}: malformed CSV: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read MCQ file {path}: {e}") from e
    return items


def _read_file(path: Path, limit: Optional[int]) -> list[MCQItem]:
    if path.suffix == ".csv":
        return _read_csv(path, limit)
    if path.suffix in (".json", ".jsonl"):
        return _read_json(path, limit)
    raise DataError(
        f"MCQ file {path}: unsupported file type {path.suffix!r}; expected one of {list(_FILE_SUFFIXES)}"
    )


def _load_hub(
    ref: str, name: Optional[str], split: str, limit: Optional[int], default_subject: str
) -> list[MCQItem]:
    if name is None:
        if ref == "cais/wmdp":
            raise ConfigError(
                "hub dataset 'cais/wmdp' needs a config name: wmdp-bio, wmdp-chem or wmdp-cyber"
            )
        if ref == "cais/mmlu":
            name = "all"
    try:
        import datasets

        data = datasets.load_dataset(ref, name, split=split)
    except Exception as e:  # network, missing config, offline: all surface as one DataError
        raise DataError(
            f"cannot load MCQ dataset {ref!r} (config {name!r}, split {split!r}) from the Hugging Face hub: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Without network, point at local files "
            f"(a data root laid out as wmdp/wmdp-bio-questions.json and mmlu/test/<subject>_test.csv, or a .json/.jsonl/.csv file)"
        ) from e
    items = []
    subject = default_subject or (name if ref == "cais/mmlu" and name and name != "all" else "")
    for i, record in enumerate(data):
        items.append(_record_item(record, f"MCQ dataset {ref!r} ({name}, {split}): record {i}", subject))
        if limit is not None and len(items) >= limit:
            break
    return items


def load_mcq(
    source: Union[str, os.PathLike],
    subject: Optional[str] = None,
    limit: Optional[int] = None,
    *,
    name: Optional[str] = None,
    split: str = "test",
) -> list[MCQItem]:
    """Read multiple-choice questions.

    Args:
        source: one of
            - a WMDP-style ``.json`` file (a list of ``{question, choices, answer}``) or ``.jsonl`` file with the
              same fields (``answer`` a 0-based index or a letter; an optional ``subject`` field is kept);
            - an MMLU ``.csv`` file, with a header (``question,choice0,...,answer``, as in the re-headed MMLU release)
              or without (the original files: question, choices, answer letter); the subject is the file name
              without ``_test.csv`` / ``_dev.csv``;
            - a folder of such files (read in name order, e.g. ``mmlu/test``);
            - a hub dataset id read with ``datasets.load_dataset`` (needs network or a local HF cache), e.g.
              ``"cais/wmdp"`` with ``name="wmdp-bio"`` or ``"cais/mmlu"`` with ``name`` a subject or ``"all"``
              (the default for ``cais/mmlu``).
        subject: set every item's subject to this (default: from the file name / record / hub config).
        limit: keep the first ``limit`` items.
        name: hub config name.
        split: hub split.

    Returns:
        The items in file order.

    Raises:
        DataError: missing or unreadable file, a record without ``question``/``choices``/``answer`` (the message
            names the file, the row or item, and the missing column), an answer out of range, fewer than 2
            choices, a hub dataset that cannot be loaded, or no items at all.
        ConfigError: a bad ``limit``, or ``cais/wmdp`` without a config name.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    ref = os.fspath(source)
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"MCQ source must be a non-empty path or hub id, got {source!r}")
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_FILE_SUFFIXES))
        if not files:
            raise DataError(f"MCQ folder {path}: no {'/'.join(_FILE_SUFFIXES)} files in it")
        items: list[MCQItem] = []
        for f in files:
            items.extend(_read_file(f, None if limit is None else limit - len(items)))
            if limit is not None and len(items) >= limit:
                break
    elif path.is_file():
        items = _read_file(path, limit)
    elif looks_local(ref):
        raise DataError(f"MCQ file {path} does not exist")
    else:
        items = _load_hub(ref, name, split, limit, "")
    if not items:
        raise DataError(f"MCQ source {ref!r}: no questions found")
    if subject is not None:
        for item in items:
            item.subject = subject
    return items


# -------------------------------------------------------------------------------------------------- tasks

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
        raise ConfigError(
            f"unknown MCQ task {task!r}; expected one of {[k for k in MCQ_TASKS if not k.startswith('mmlu_')]} "
            f"or mmlu_<subject> with a subject among {list(MMLU_SUBJECTS)}"
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


# ------------------------------------------------------------------------------------------------ prompts


def _check_variant(variant: str) -> str:
    if variant not in MCQ_VARIANTS:
        raise ConfigError(f"unknown MCQ variant {variant!r}; expected one of {list(MCQ_VARIANTS)}")
    return variant


def _description(subject: str, variant: str) -> str:
    kind = "multiple choice questions" if variant == "letter" else "questions"
    subject = subject.replace("_", " ").strip()
    about = f" about {subject}" if subject else ""
    return f"The following are {kind} (with answers){about}.\n\n"


def _question_text(item: MCQItem, variant: str) -> str:
    if variant == "cloze":
        return f"Question: {item.question.strip()}\nAnswer:"
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def _render_chat(tokenizer: Any, messages: list[dict]) -> str:
    if tokenizer is None:
        raise ConfigError("chat_template=True needs the tokenizer (to apply its chat template)")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"chat_template=True, but the tokenizer {type(tokenizer).__name__} has no chat template"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError: e.g. a template that refuses a system role
        if messages and messages[0]["role"] == "system":
            log.warning("chat template failed (%s); retrying without the system message, as lm-eval does", e)
            return _render_chat(tokenizer, messages[1:])
        raise ConfigError(f"cannot apply the tokenizer's chat template: {e}") from e


def format_context(
    item: MCQItem,
    subject: Optional[str] = None,
    *,
    variant: str = "letter",
    chat_template: bool = False,
    system_prompt: Optional[str] = None,
    tokenizer: Any = None,
) -> str:
    """The context string of one question, exactly as lm-evaluation-harness 0.4 renders it zero-shot.

    Args:
        item: the question.
        subject: the subject in the description (``_`` become spaces); default ``item.subject``; with no subject
            at all the description reads ``"The following are multiple choice questions (with answers).\\n\\n"``.
        variant: ``"letter"`` (the standard format), ``"cloze"`` (``mmlu_continuation`` style) or ``"raw"``
            (the question text as is).
        chat_template: render with the tokenizer's chat template (description as system message, question as user
            message, generation prompt added).
        system_prompt: prepended to the description (joined with ``"\\n\\n"``), in the system message under a
            chat template.
        tokenizer: needed for ``chat_template=True``.

    Returns:
        The context; the continuations are :func:`continuations`.
    """
    _check_variant(variant)
    if variant == "raw":
        if chat_template:
            raise ConfigError("the 'raw' MCQ variant scores plain question stems; it has no chat-template form")
        return item.question if system_prompt is None else f"{system_prompt}\n\n{item.question}"
    description = _description(item.subject if subject is None else subject, variant)
    system = description if system_prompt is None else f"{system_prompt}\n\n{description}"
    text = _question_text(item, variant)
    if not chat_template:
        return system + text
    return _render_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": text}])


def continuations(item: MCQItem, variant: str = "letter", chat_template: bool = False) -> list[str]:
    """The strings scored after the context: ``" A"``, ``" B"``, ... (letter) or ``" {choice}"`` (cloze, raw).

    Under a chat template the leading space is dropped (lm-eval's target delimiter becomes ``""``).
    """
    _check_variant(variant)
    delim = "" if chat_template else " "
    if variant == "letter":
        return [f"{delim}{LETTERS[i]}" for i in range(len(item.choices))]
    return [f"{delim}{c}" for c in item.choices]


def setting_label(variant: str, chat_template: bool, system_prompt: Optional[str]) -> str:
    """A short name of one evaluation setting: ``letter``, ``letter+chat``, ``cloze+chat+system`` ..."""
    return variant + ("+chat" if chat_template else "") + ("+system" if system_prompt is not None else "")


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class MCQResult:
    """The outcome of scoring a set of questions in one setting.

    Attributes:
        accuracy: fraction of questions whose top-scoring choice is the answer (torchmetrics
            ``MulticlassAccuracy(average="micro")`` of predictions vs answers).
        n: number of questions.
        variant: ``"letter"``, ``"cloze"`` or ``"raw"``.
        chat_template: whether the chat template was applied.
        system_prompt: the system prompt used, if any.
        records: one dict per question, in input order: ``index``, ``subject``, ``answer``, ``pred``, ``correct``,
            ``scores`` (summed log-probability of every choice's continuation; comparable to lm-eval's per-sample
            ``resps``), plus ``pred_norm`` for cloze.
        pred_histogram: fraction of the questions predicted as each letter (a small model often collapses onto
            one letter).
        answer_histogram: fraction of the questions whose answer is each letter.
        acc_norm: cloze only: accuracy of the length-normalised scores (log-prob / characters of the choice, as
            lm-eval's ``acc_norm``).
        subject_accuracy: accuracy per subject, when the questions span several subjects.
        task: the task name, when known.
        forward_passes: number of model forward calls made.
    """

    accuracy: float
    n: int
    variant: str = "letter"
    chat_template: bool = False
    system_prompt: Optional[str] = None
    records: list[dict] = field(default_factory=list)
    pred_histogram: dict[str, float] = field(default_factory=dict)
    answer_histogram: dict[str, float] = field(default_factory=dict)
    acc_norm: Optional[float] = None
    subject_accuracy: dict[str, float] = field(default_factory=dict)
    task: str = ""
    forward_passes: int = 0

    @property
    def setting(self) -> str:
        return setting_label(self.variant, self.chat_template, self.system_prompt)

    @property
    def preds(self) -> list[int]:
        return [r["pred"] for r in self.records]

    def to_dict(self, records: bool = True) -> dict:
        """A JSON-serialisable dict of everything (``records=False`` leaves out the per-question records)."""
        out = {
            "task": self.task,
            "setting": self.setting,
            "variant": self.variant,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "accuracy": self.accuracy,
            "acc_norm": self.acc_norm,
            "n": self.n,
            "pred_histogram": dict(self.pred_histogram),
            "answer_histogram": dict(self.answer_histogram),
            "subject_accuracy": dict(self.subject_accuracy),
            "forward_passes": self.forward_passes,
        }
        if records:
            out["records"] = [dict(r) for r in self.records]
        return out


@dataclass
class _Row:
    """One input sequence and the (question, choice, positions, tokens) log-probs to read from it."""

    ids: list[int]
    gathers: list[tuple[int, int, list[int], list[int]]]


def _max_length(model: Any, tokenizer: Any) -> int:
    """The model's context length as lm-eval's ``HFLM.max_length`` finds it."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return 2048


def _encode_all(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 1024):
        out.extend(
            list(ids)
            for ids in tokenizer(texts[i : i + 1024], add_special_tokens=add_special_tokens)["input_ids"]
        )
    return out


def _build_rows(
    tokenizer: Any,
    contexts: list[str],
    conts: list[list[str]],
    max_len: int,
    add_special_tokens: bool,
) -> list[_Row]:
    """Encode (context, continuation) pairs like lm-eval's ``_encode_pair`` and plan the forward passes."""
    ctx_texts: list[str] = []
    whole_texts: list[str] = []
    for ctx, cs in zip(contexts, conts, strict=True):
        n_spaces = len(ctx) - len(ctx.rstrip())
        head, tail = (ctx[:-n_spaces], ctx[-n_spaces:]) if n_spaces else (ctx, "")
        ctx_texts.append(head)
        whole_texts.extend(head + tail + c for c in cs)
    ctx_encs = _encode_all(tokenizer, ctx_texts, add_special_tokens)
    whole_encs = _encode_all(tokenizer, whole_texts, add_special_tokens)

    rows: list[_Row] = []
    k = 0
    for q, (ctx_enc, cs) in enumerate(zip(ctx_encs, conts, strict=True)):
        if not ctx_enc:
            raise DataError(f"question {q}: the context encodes to no tokens")
        cont_encs = [whole_encs[k + j][len(ctx_enc) :] for j in range(len(cs))]
        k += len(cs)
        for j, enc in enumerate(cont_encs):
            if not enc:
                raise DataError(
                    f"question {q}: choice {j} ({cs[j]!r}) encodes to no tokens after the context"
                )
            if len(enc) > max_len:
                raise DataError(
                    f"question {q}: choice {j} has {len(enc)} tokens, more than the model's {max_len}"
                )
        lengths = {len(e) for e in cont_encs}
        shared = len(lengths) == 1 and all(e[:-1] == cont_encs[0][:-1] for e in cont_encs)
        if shared:
            # One sequence: context + the common continuation prefix; every choice differs only in its last token.
            ids = (ctx_enc + cont_encs[0][:-1])[-max_len:]
            n, m = len(ids), len(cont_encs[0])
            positions = list(range(n - m, n))
            rows.append(_Row(ids, [(q, j, positions, enc) for j, enc in enumerate(cont_encs)]))
        else:
            for j, enc in enumerate(cont_encs):
                ids = (ctx_enc + enc)[-(max_len + 1) :][:-1]
                n, m = len(ids), len(enc)
                rows.append(_Row(ids, [(q, j, list(range(n - m, n)), enc)]))
    return rows


#: Recent question encodings, most recent last: ``key -> (tokenizer, rows)``. Rows depend only on the tokenizer and
#: the texts, and evaluators score the same questions again after every few attack steps, so they are encoded once.
_ROWS_CACHE: OrderedDict[tuple, tuple[Any, list[_Row]]] = OrderedDict()
_ROWS_CACHE_SIZE = 8


def _rows_for(
    tokenizer: Any,
    contexts: list[str],
    conts: list[list[str]],
    max_len: int,
    add_special_tokens: bool,
) -> list[_Row]:
    """:func:`_build_rows`, reusing the rows of an earlier call with the same tokenizer object and texts."""
    try:
        vocab = len(tokenizer)  # tokens added to the same tokenizer object change the key
    except TypeError:
        vocab = None
    key = (id(tokenizer), vocab, max_len, add_special_tokens, tuple(contexts), tuple(tuple(c) for c in conts))
    hit = _ROWS_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        _ROWS_CACHE.move_to_end(key)
        return hit[1]
    rows = _build_rows(tokenizer, contexts, conts, max_len, add_special_tokens)
    _ROWS_CACHE[key] = (tokenizer, rows)  # holding the tokenizer keeps its id from being reused
    while len(_ROWS_CACHE) > _ROWS_CACHE_SIZE:
        _ROWS_CACHE.popitem(last=False)
    return rows


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _run_rows(
    model: Any, rows: list[_Row], n_choices: list[int], batch_size: int, pad_id: int, progress: Optional[str] = None
):
    """Forward the rows ``batch_size`` at a time (longest first, right-padded); summed log-probs per choice.

    With ``progress`` (a label), progress over the forward batches is shown on stderr (:mod:`.progress`).
    """
    scores = [[math.nan] * k for k in n_choices]
    device = next(model.parameters()).device
    keep_ok = _supports_logits_to_keep(model)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].ids))
    passes = 0
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, total=len(starts), desc=progress or "", unit="batch",
                              enabled=progress is not None):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        width = max(len(r.ids) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, row in enumerate(chunk):
            ids[b, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
            mask[b, : len(row.ids)] = 1
        first = min(g[2][0] for row in chunk for g in row.gathers)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "use_cache": False,
        }
        if keep_ok:
            kwargs["logits_to_keep"] = width - first
        logits = model(**kwargs).logits
        passes += 1
        offset = width - logits.shape[1]  # position p is logits[:, p - offset]
        # One log-softmax over the vocabulary of every kept position and one gather of every (row, position,
        # token) read; the sum of each choice's tokens is then taken per group of equal-length choices.
        logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        by_length: dict[int, tuple[list[tuple[int, int]], list[int], list[int], list[int]]] = {}
        for b, row in enumerate(chunk):
            for q, j, positions, tokens in row.gathers:
                keys, bs, ps, ts = by_length.setdefault(len(tokens), ([], [], [], []))
                keys.append((q, j))
                bs.extend([b] * len(tokens))
                ps.extend(p - offset for p in positions)
                ts.extend(tokens)
        for m, (keys, bs, ps, ts) in by_length.items():
            index = [torch.tensor(x, device=logp.device) for x in (bs, ps, ts)]
            sums = logp[index[0], index[1], index[2]].view(len(keys), m).sum(dim=1).tolist()
            for (q, j), value in zip(keys, sums, strict=True):
                scores[q][j] = value
    return scores, passes


def _argmax(values: Sequence[float]) -> int:
    """Index of the maximum; the first one on ties (as ``numpy.argmax`` in lm-eval)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _accuracy(preds: list[int], targets: list[int], num_classes: int) -> float:
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=max(num_classes, 2), average="micro")
    value = float(metric(torch.tensor(preds), torch.tensor(targets)))
    # torchmetrics returns float32; snap to the exact fraction k / n it stands for.
    return round(value * len(preds)) / len(preds)


def _histogram(values: list[int], num_classes: int) -> dict[str, float]:
    counts = Counter(values)
    n = max(len(values), 1)
    return {LETTERS[i]: counts.get(i, 0) / n for i in range(num_classes)}


def score_mcq(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCQItem],
    *,
    variant: str = "letter",
    chat_template: bool = False,
    system_prompt: Optional[str] = None,
    batch_size: int = 16,
    subject: Optional[str] = None,
    max_length: Optional[int] = None,
    add_special_tokens: bool = False,
    task: str = "",
    progress: bool = False,
) -> MCQResult:
    """Score multiple-choice questions with a causal LM (see the module docstring for the exact protocol).

    Args:
        model: a Hugging Face causal LM (any device and dtype; log-softmax runs in fp32). Put into eval mode for
            the call and restored to its previous mode afterwards; no gradients are recorded.
        tokenizer: its tokenizer.
        items: the questions.
        variant: ``"letter"`` (default, lm-eval's standard), ``"cloze"`` (answer-text log-likelihood) or ``"raw"``
            (the bare question stem followed by each choice; summed log-probability).
        chat_template: apply the tokenizer's chat template (lm-eval ``--apply_chat_template``).
        system_prompt: a system prompt (lm-eval ``--system_instruction``).
        batch_size: sequences per forward pass (a question is one sequence when its continuations differ only in
            the last token, otherwise one per choice).
        subject: the subject in every prompt (default: each item's own).
        max_length: left-truncate inputs to this many tokens (default: the model's context length as lm-eval
            reads it from the config).
        add_special_tokens: encode with the tokenizer's special tokens (BOS); ``False`` is lm-eval's default for
            causal LMs (``add_bos_token=False``).
        task: a name stored in the result.
        progress: show progress over the forward batches on stderr, labelled with the task and setting (a bar on
            a terminal, plain lines otherwise: :func:`tar_lightning.evaluation.progress.progress`).

    Returns:
        An :class:`MCQResult`.

    Raises:
        ConfigError: no items, bad variant or batch size, chat template requested but missing.
        DataError: a continuation that encodes to no tokens.
    """
    _check_variant(variant)
    items = list(items)
    if not items:
        raise ConfigError("score_mcq: no questions to score")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    max_len = max_length if max_length is not None else _max_length(model, tokenizer)
    contexts = [
        format_context(
            it,
            subject,
            variant=variant,
            chat_template=chat_template,
            system_prompt=system_prompt,
            tokenizer=tokenizer,
        )
        for it in items
    ]
    conts = [continuations(it, variant, chat_template) for it in items]
    rows = _rows_for(tokenizer, contexts, conts, max_len, add_special_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            label = f"{task or 'mcq'} {setting_label(variant, bool(chat_template), system_prompt)}"
            scores, passes = _run_rows(model, rows, [len(c) for c in conts], batch_size, pad_id,
                                       label if progress else None)
    finally:
        model.train(was_training)

    num_classes = max(len(it.choices) for it in items)
    preds = [_argmax(s) for s in scores]
    targets = [it.answer for it in items]
    records = []
    norm_preds: list[int] = []
    for i, (it, s, p) in enumerate(zip(items, scores, preds, strict=True)):
        rec = {
            "index": i,
            "subject": subject if subject is not None else it.subject,
            "answer": it.answer,
            "pred": p,
            "correct": p == it.answer,
            "scores": s,
        }
        if variant == "cloze":
            pn = _argmax([v / max(len(c), 1) for v, c in zip(s, it.choices, strict=True)])
            norm_preds.append(pn)
            rec["pred_norm"] = pn
        records.append(rec)

    subjects = sorted({r["subject"] for r in records})
    subject_accuracy = {}
    if len(subjects) > 1:
        for s in subjects:
            rs = [r for r in records if r["subject"] == s]
            subject_accuracy[s] = sum(r["correct"] for r in rs) / len(rs)
    return MCQResult(
        accuracy=_accuracy(preds, targets, num_classes),
        n=len(items),
        variant=variant,
        chat_template=bool(chat_template),
        system_prompt=system_prompt,
        records=records,
        pred_histogram=_histogram(preds, num_classes),
        answer_histogram=_histogram(targets, num_classes),
        acc_norm=_accuracy(norm_preds, targets, num_classes) if variant == "cloze" else None,
        subject_accuracy=subject_accuracy,
        task=task,
        forward_passes=passes,
    )


def _as_settings(value: Any, what: str) -> list:
    if isinstance(value, str) and what == "chat_template":
        if value == "both":
            return [False, True]
        raise ConfigError(f"chat_template must be true, false or 'both', got {value!r}")
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def evaluate_mcq_task(
    model: Any,
    tokenizer: Any,
    task: Union[str, MCQTask],
    data_root: Union[str, os.PathLike, None] = None,
    limit: Optional[int] = None,
    variants: Sequence[str] = ("letter",),
    *,
    chat_template: Union[bool, str, Sequence[bool]] = False,
    system_prompt: Union[None, str, Sequence[Optional[str]]] = None,
    batch_size: int = 16,
    max_length: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Load a named task (see :data:`MCQ_TASKS`) and score it in every requested setting.

    Args:
        model, tokenizer: the model to evaluate.
        task: a task name or :class:`MCQTask`.
        data_root: folder laid out as ``wmdp/wmdp-<bio|chem|cyber>-questions.json``, ``mmlu/test/<subject>_test.csv`` (default: ``$TAR_LIGHTNING_DATA``, else the hub).
        limit: score only the first ``limit`` questions.
        variants: any of ``"letter"``, ``"cloze"``, ``"raw"``.
        chat_template: ``False``, ``True``, ``"both"``, or a list of booleans.
        system_prompt: ``None``, a string, or a list of ``None``/strings (e.g. ``[None, "You are ..."]`` for with
            and without).
        batch_size, max_length, progress: see :func:`score_mcq` (progress per setting).

    Returns:
        ``{"task", "source", "n", "results": {setting label: MCQResult.to_dict()}}``; the setting labels come from
        :func:`setting_label` (``"letter"``, ``"letter+chat"``, ``"cloze+system"`` ...).
    """
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    if not variants:
        raise ConfigError("variants: give at least one of " + ", ".join(MCQ_VARIANTS))
    for v in variants:
        _check_variant(v)
    chats = _as_settings(chat_template, "chat_template")
    systems = _as_settings(system_prompt, "system_prompt")
    spec, items, where = load_task_items(task, data_root, limit)
    results: dict[str, dict] = {}
    for variant in variants:
        for chat in chats:
            for system in systems:
                res = score_mcq(
                    model,
                    tokenizer,
                    items,
                    variant=variant,
                    chat_template=bool(chat),
                    system_prompt=system,
                    batch_size=batch_size,
                    max_length=max_length,
                    task=spec.name,
                    progress=progress,
                )
                results[res.setting] = res.to_dict()
    return {"task": spec.name, "source": where, "n": len(items), "results": results}
