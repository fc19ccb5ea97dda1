"""Multiple-choice questions: :class:`MCQItem`, parsing answers, reading WMDP-style JSON/JSON lines, MMLU CSV
files, folders of them and hub datasets (:func:`load_mcq`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import datasets

from tar_lightning.common import is_int, looks_local
from tar_lightning.errors import ConfigError, DataError

__all__ = ["LETTERS", "MCQItem", "load_mcq"]

#: The choice letters, in order: choice ``i`` is ``LETTERS[i]``.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_SPLIT_SUFFIXES = ("_test", "_dev", "_val", "_validation", "_train")
_FILE_SUFFIXES = (".csv", ".json", ".jsonl")


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
    if limit is not None and (not is_int(limit) or limit < 1):
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
