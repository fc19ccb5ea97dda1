"""Data sources: where a stream's records come from, and reading them into plain Python records.

One :class:`DataSource` names a hub dataset, a local file or folder (txt, json, jsonl, csv, parquet, optionally
gzipped), a built-in synthetic domain, or a split of the invented knowledge world
(:mod:`tar_lightning.data.knowledge`). :func:`load_records` reads it through ``datasets`` (one code path for
hub ids and local files), keeps the records matching ``filter`` (logged), applies ``select``, drops too-short
records (logged) and applies ``limit``.
Every problem a user can cause is raised as :class:`~tar_lightning.errors.DataError` or
:class:`~tar_lightning.errors.ConfigError` naming the file, field or value.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import datasets
from datasets.utils import logging as ds_logging

from tar_lightning.common import is_int, looks_local
from tar_lightning.data.knowledge import KNOWLEDGE_SPLITS, check_world_kwargs, knowledge_records
from tar_lightning.data.synthetic import SYNTHETIC_DOMAINS, synthetic_records
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.schema import int_at_least, positive_int_or_none

__all__ = [
    "PROMPT_PLACEHOLDER",
    "DataSource",
    "apply_prompt_template",
    "as_source",
    "check_prompt_template",
    "load_records",
    "select_range",
    "source_text",
]

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
KNOWLEDGE_PREFIX = "knowledge:"
_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_SYNTHETIC_KEYS = ("n", "seed")
_SELECT_RE = re.compile(r"^\s*(-?\d+%?|\d+(?:\.\d+)?%)?\s*:\s*(-?\d+%?|\d+(?:\.\d+)?%)?\s*$")
#: where a ``prompt_template`` puts the prompt
PROMPT_PLACEHOLDER = "{prompt}"


def check_prompt_template(template: object, where: str) -> str:
    """Check a prompt template: a string holding :data:`PROMPT_PLACEHOLDER` exactly once.

    Args:
        template: the value to check.
        where: names the key in the error message (e.g. ``"data source 'x.json': 'prompt_template'"``).

    Returns:
        The template.

    Raises:
        ConfigError: not a string, or ``{prompt}`` missing or repeated.
    """
    if not isinstance(template, str):
        raise ConfigError(f"{where} must be a string containing {PROMPT_PLACEHOLDER!r} once, got {template!r}")
    count = template.count(PROMPT_PLACEHOLDER)
    if count != 1:
        raise ConfigError(
            f"{where} must contain {PROMPT_PLACEHOLDER!r} exactly once (where the prompt goes), found it {count} "
            f"times in {template[:80]!r}"
        )
    return template


def apply_prompt_template(template: Optional[str], prompt: str) -> str:
    """``prompt`` put into ``template`` at ``{prompt}`` (plain replacement: other braces stay as written);
    ``None`` returns the prompt unchanged."""
    if template is None:
        return prompt
    return template.replace(PROMPT_PLACEHOLDER, prompt)


@dataclass
class DataSource:
    """Where one data stream comes from and how its records become text.

    Attributes:
        path: a hub dataset id (read with ``datasets.load_dataset``), a local ``.txt``/``.json``/``.jsonl``/
            ``.csv``/``.parquet`` file (``.gz`` allowed except for parquet), a local folder of such files, or
            ``"synthetic:<domain>"`` (see :mod:`tar_lightning.data.synthetic`), or ``"knowledge:<split>"`` (a text
            split of the invented knowledge world, see :mod:`tar_lightning.data.knowledge`; its records also
            carry ``prompt``/``response``/``answer``/``answer_start``/``answer_end`` and ``entity``/``attribute``/
            ``group`` fields usable in ``filter``).
        split: split of a hub dataset (local files have a single split).
        name: hub config name (e.g. ``"wikitext-2-raw-v1"``).
        text_field: field holding plain text.
        prompt_field: instruction data: field of the prompt. With ``response_field`` the pair is rendered with
            the tokenizer's chat template and the prompt tokens are labelled -100.
        response_field: instruction data: field of the response.
        messages_field: chat data: field holding a list of ``{"role", "content"}`` messages; only the last
            assistant turn is labelled.
        system_prompt: system message prepended to chat data (unless the messages already start with one).
        filter: keep only the records whose fields equal these values, e.g. ``{"label": True}`` for the
            forget half of a labelled corpus (Pile-bio). Applied right after reading, before ``select``, so
            ``select`` percentages are shares of the matching records. The number dropped is logged.
        select: slice of the records after loading (and ``filter``), ``"start:stop"`` with integers or
            percentages (``"0:80%"``, ``"80%:"``, ``"0:1000"``); used to split one corpus into disjoint parts.
        limit: keep at most this many records (after ``select`` and filtering).
        min_chars: drop records whose text (the response for chat data) is shorter; the count is logged.
        synthetic: arguments of synthetic sources: ``n`` (records) and ``seed``.
        knowledge: arguments of knowledge sources: :func:`~tar_lightning.data.knowledge.build_world`'s
            (``n_forget``, ``n_retain``, ``n_forget_A``, ``n_values``, ``n_heldout``, ``seed``, ...).
        label_span: plain text: two fields holding the start and end character offsets of the only labelled span.
        prompt_template: chat data: a string containing ``{prompt}`` exactly once; every prompt (the
            ``prompt_field``, or the last user turn before the labelled assistant turn of ``messages_field``) is
            put into it before the chat template renders the conversation, e.g. a jailbreak preamble for
            jailbreak-tuning (docs/REDTEAM_JAILBREAK.md). The template's tokens belong to the prompt, so they
            are labelled -100. Plain-text sources refuse it.
    """

    path: str
    split: str = "train"
    name: Optional[str] = None
    text_field: str = "text"
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    messages_field: Optional[str] = None
    system_prompt: Optional[str] = None
    filter: dict = field(default_factory=dict)
    select: Optional[str] = None
    limit: Optional[int] = None
    min_chars: int = 1
    synthetic: dict = field(default_factory=dict)
    knowledge: dict = field(default_factory=dict)
    label_span: Optional[list[str]] = None
    prompt_template: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"data source: 'path' must be a non-empty string, got {self.path!r}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ConfigError(
                f"data source {self.path!r}: 'prompt_field' and 'response_field' must be set together "
                f"(got prompt_field={self.prompt_field!r}, response_field={self.response_field!r})"
            )
        if self.label_span is not None:
            if (
                not isinstance(self.label_span, (list, tuple))
                or len(self.label_span) != 2
                or not all(isinstance(k, str) and k for k in self.label_span)
            ):
                raise ConfigError(
                    f"data source {self.path!r}: 'label_span' must name two fields holding the start and end "
                    f"character offsets of the labelled span, e.g. [answer_start, answer_end]; got {self.label_span!r}"
                )
            if self.prompt_field is not None or self.messages_field is not None:
                raise ConfigError(
                    f"data source {self.path!r}: 'label_span' applies to plain text; chat data already labels "
                    "only the response"
                )
            self.label_span = list(self.label_span)
        if self.messages_field is not None and self.prompt_field is not None:
            raise ConfigError(
                f"data source {self.path!r}: set either 'messages_field' or 'prompt_field'/'response_field', not both"
            )
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template, f"data source {self.path!r}: 'prompt_template'")
            if not self.is_chat:
                raise ConfigError(
                    f"data source {self.path!r}: 'prompt_template' applies to chat data (prompt_field/"
                    "response_field or messages_field); a plain-text source has no prompt to put into it"
                )
        if not isinstance(self.filter, Mapping):
            raise ConfigError(
                f"data source {self.path!r}: 'filter' must be a mapping of field name -> value, got {self.filter!r}"
            )
        self.filter = dict(self.filter)
        bad_keys = [k for k in self.filter if not isinstance(k, str) or not k]
        if bad_keys:
            raise ConfigError(
                f"data source {self.path!r}: 'filter' keys must be field names (non-empty strings), got {bad_keys}"
            )
        if self.select is not None:
            _parse_select(self.select, self.path)
        positive_int_or_none(self.limit, f"data source {self.path!r}: 'limit'")
        if not is_int(self.min_chars) or self.min_chars < 0:
            raise ConfigError(
                f"data source {self.path!r}: 'min_chars' must be a non-negative integer, got {self.min_chars!r}"
            )
        if not isinstance(self.synthetic, Mapping):
            raise ConfigError(
                f"data source {self.path!r}: 'synthetic' must be a mapping, got {self.synthetic!r}"
            )
        unknown = sorted(set(self.synthetic) - set(_SYNTHETIC_KEYS))
        if unknown:
            raise ConfigError(
                f"data source {self.path!r}: unknown 'synthetic' keys {unknown}; expected some of {list(_SYNTHETIC_KEYS)}"
            )
        for key, minimum in (("n", 1), ("seed", 0)):
            value = self.synthetic.get(key)
            if value is not None:
                int_at_least(minimum)(value, f"data source {self.path!r}: 'synthetic.{key}'")
        if self.is_synthetic:
            domain = self.path[len(SYNTHETIC_PREFIX) :]
            if domain not in SYNTHETIC_DOMAINS:
                raise ConfigError(
                    f"data source {self.path!r}: unknown synthetic domain {domain!r}; expected one of "
                    f"{[SYNTHETIC_PREFIX + d for d in SYNTHETIC_DOMAINS]}"
                )
        if not isinstance(self.knowledge, Mapping):
            raise ConfigError(
                f"data source {self.path!r}: 'knowledge' must be a mapping, got {self.knowledge!r}"
            )
        self.knowledge = dict(self.knowledge)
        if self.is_knowledge:
            split = self.path[len(KNOWLEDGE_PREFIX) :]
            if split not in KNOWLEDGE_SPLITS:
                raise ConfigError(
                    f"data source {self.path!r}: unknown knowledge split {split!r}; expected one of "
                    f"{[KNOWLEDGE_PREFIX + s for s in KNOWLEDGE_SPLITS]}"
                )
            try:
                check_world_kwargs(self.knowledge)
            except ConfigError as e:
                raise ConfigError(f"data source {self.path!r}: 'knowledge': {e}") from None
        elif self.knowledge:
            raise ConfigError(
                f"data source {self.path!r}: 'knowledge' arguments are only used by 'knowledge:<split>' sources"
            )

    @property
    def is_synthetic(self) -> bool:
        return self.path.startswith(SYNTHETIC_PREFIX)

    @property
    def is_knowledge(self) -> bool:
        return self.path.startswith(KNOWLEDGE_PREFIX)

    @property
    def is_chat(self) -> bool:
        """Whether records are rendered with a chat template (prompt/response or messages)."""
        return self.prompt_field is not None or self.messages_field is not None

    @property
    def required_fields(self) -> list[str]:
        if self.messages_field is not None:
            return [self.messages_field]
        if self.prompt_field is not None:
            return [self.prompt_field, self.response_field]  # type: ignore[list-item]
        return [self.text_field]

    def label(self) -> str:
        """A short human-readable name of the source for messages and logs."""
        parts = [repr(self.path)]
        if self.name:
            parts.append(f"name={self.name!r}")
        if self.filter:
            parts.append(f"filter={self.filter!r}")
        if self.select:
            parts.append(f"select={self.select!r}")
        return " ".join(parts)


def as_source(value: Union[DataSource, Mapping, str], what: str = "data source") -> DataSource:
    """Coerce a :class:`DataSource`, a mapping of its fields, or a bare path into a :class:`DataSource`.

    Raises:
        ConfigError: unknown keys or a value of another type.
    """
    if isinstance(value, DataSource):
        return value
    if isinstance(value, str):
        return DataSource(path=value)
    if isinstance(value, Mapping):
        known = {f.name for f in fields(DataSource)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{what}: unknown keys {unknown}; expected some of {sorted(known)}")
        if "path" not in value:
            raise ConfigError(f"{what}: missing required key 'path' (got keys {sorted(value)})")
        try:
            return DataSource(**dict(value))
        except ConfigError as err:  # a field's own check: say where the source came from
            raise ConfigError(f"{what}: {err}") from None
    raise ConfigError(
        f"{what}: expected a DataSource, a mapping or a path string, got {type(value).__name__}"
    )


# ---------------------------------------------------------------------------------------------- select
def _parse_bound(text: Optional[str]) -> Union[None, int, float]:
    if text is None or text == "":
        return None
    if text.endswith("%"):
        return float(text[:-1])
    return int(text)


def _parse_select(spec: str, where: str) -> tuple[Union[None, int, float], Union[None, int, float]]:
    m = _SELECT_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ConfigError(
            f"data source {where!r}: invalid 'select' {spec!r}; expected 'start:stop' with integers or "
            "percentages, e.g. '0:80%', '80%:', '0:1000'"
        )
    lo, hi = _parse_bound(m.group(1)), _parse_bound(m.group(2))
    for b in (lo, hi):
        if isinstance(b, float) and not 0.0 <= b <= 100.0:
            raise ConfigError(f"data source {where!r}: 'select' {spec!r}: percentages must lie in 0%..100%")
    return lo, hi


def _resolve_bound(b: Union[None, int, float], n: int) -> Optional[int]:
    if isinstance(b, float):
        # Both halves of a split ("0:80%" / "80%:") use the same floor, so they partition the records exactly.
        return math.floor(n * b / 100.0 + 1e-9)
    return b


def select_range(spec: Optional[str], n: int, where: str = "select") -> range:
    """The record indices a ``select`` spec keeps out of ``n`` records (Python slice semantics)."""
    if spec is None:
        return range(n)
    lo, hi = _parse_select(spec, where)
    return range(n)[slice(_resolve_bound(lo, n), _resolve_bound(hi, n))]


# ---------------------------------------------------------------------------------------------- readers
@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets`` progress bars and its own error log while reading (we re-raise with context)."""
    bars = datasets.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None or (seen.__context__ is not None and not seen.__suppress_context__):
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    msg = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _format_of(path: Path) -> Optional[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _scan_jsonl(path: Path) -> None:
    """Find the first malformed line of a JSON Lines file and raise with its number."""
    kinds: dict[str, tuple[str, int]] = {}
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                        "expected one JSON object per line"
                    ) from None
                if not isinstance(value, dict):
                    raise DataError(
                        f"{path}: line {lineno}: expected a JSON object per line, got {type(value).__name__}"
                    )
                for key, item in value.items():  # a field whose JSON type differs from its first occurrence
                    if item is None:
                        continue
                    kind = _json_kind(item)
                    first = kinds.setdefault(key, (kind, lineno))
                    if first[0] != kind:
                        raise DataError(
                            f"{path}: line {lineno}: field {key!r} is {kind} here but {first[0]} on line {first[1]}; "
                            "every record must use the same type for a field"
                        )
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_layout(path: Path) -> tuple[str, Optional[str]]:
    """How to read a ``.json`` file: ``("json", None)`` list, ``("json", "data")`` wrapped, ``("jsonl", None)``."""
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f'{path}: the file is empty; expected a JSON list of objects or {{"data": [...]}}')
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if stripped[0] == "{":
            return "jsonl", None  # several objects, one per line, in a file named .json
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, list):
        return "json", None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        return "json", "data"
    if isinstance(value, dict):
        return "jsonl", None  # a single object: JSON Lines with one line
    raise DataError(
        f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {type(value).__name__}'
    )


def _load_local_file(path: Path) -> tuple[Any, str]:
    """Read one local file into a ``datasets.Dataset``; returns ``(dataset, format)``."""
    fmt = _format_of(path)
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type; expected one of {sorted(_FORMATS)} (optionally .gz, except parquet)"
        )
    kwargs: dict[str, Any] = {}
    builder = {"text": "text", "json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    if fmt == "json":
        fmt, json_field = _json_layout(path)
        if json_field is not None:
            kwargs["field"] = json_field
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
            if fmt == "text":
                # One record per non-empty line: blank lines separate paragraphs, they are not records.
                ds = ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    except DataError:
        raise
    except Exception as e:
        if fmt == "jsonl":
            _scan_jsonl(path)
        if "corresponds to no data" in str(e):
            raise DataError(f"{path}: no records found (the file holds no data rows)") from e
        raise DataError(f"{path}: cannot read as {fmt} ({_root_cause(e)})") from e
    return ds, fmt


def _local_files(folder: Path) -> list[Path]:
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and _format_of(p) is not None:
            found.append(p)
    return found


def _check_columns(columns: list[str], source: DataSource, where: str) -> None:
    missing = [f for f in source.required_fields if f not in columns]
    if missing:
        kind = "field" if len(missing) == 1 else "fields"
        raise DataError(
            f"data source {source.label()}: {where} has no {kind} {', '.join(repr(m) for m in missing)}; "
            f"available fields: {sorted(columns)}"
        )


def _read_raw(source: DataSource) -> list[tuple[Any, str]]:
    """Read the source into ``[(dataset_or_list, where)]`` parts, in order; fields are checked per part."""
    if source.is_synthetic:
        domain = source.path[len(SYNTHETIC_PREFIX) :]
        args = {"n": 256, "seed": 0, **dict(source.synthetic)}
        return [(synthetic_records(domain, n=args["n"], seed=args["seed"]), source.path)]
    if source.is_knowledge:
        split = source.path[len(KNOWLEDGE_PREFIX) :]
        return [(knowledge_records(split, **source.knowledge), source.path)]

    local = Path(os.path.expanduser(source.path))
    if local.exists():
        if local.is_dir():
            files = _local_files(local)
            if not files:
                raise DataError(
                    f"data source {source.label()}: folder {local.resolve()} holds no readable data files; "
                    f"expected files ending in {sorted(_FORMATS)}"
                )
        else:
            files = [local]
        return [(_load_local_file(f)[0], str(f)) for f in files]
    if looks_local(source.path):
        raise DataError(
            f"data source {source.label()}: file or folder not found: {local.resolve()} "
            f"(relative paths are resolved against the working directory {os.getcwd()})"
        )

    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as e:
        raise DataError(
            f"data source {source.label()}: cannot load hub dataset {source.path!r} "
            f"(name={source.name!r}, split={source.split!r}): {_root_cause(e)}. "
            "Without network access, point 'path' at a local file or folder instead."
        ) from e
    return [(ds, f"hub dataset {source.path!r} split {source.split!r}")]


# ---------------------------------------------------------------------------------------------- records
def _as_text(value: Any, fieldname: str, source: DataSource, index: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise DataError(
        f"data source {source.label()}: record {index}: field {fieldname!r} must be a string, "
        f"got {type(value).__name__} ({str(value)[:60]!r})"
    )


def _messages(record: Mapping, source: DataSource, index: int) -> list[dict]:
    value = record.get(source.messages_field)  # type: ignore[arg-type]
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"data source {source.label()}: record {index}: field {source.messages_field!r} must be a list of "
            f"{{'role', 'content'}} messages, got {type(value).__name__}"
        )
    out = []
    for k, msg in enumerate(value):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise DataError(
                f"data source {source.label()}: record {index}: message {k} of field {source.messages_field!r} "
                f"must be a mapping with a string 'role' and a 'content', got {str(msg)[:80]!r}"
            )
        out.append({"role": msg["role"], "content": _as_text(msg["content"], "content", source, index)})
    return out


def source_text(record: Mapping, source: DataSource, index: int = 0) -> str:
    """The text ``min_chars`` is measured on: the text field, the response, or the last assistant turn.

    Raises:
        DataError: a field holds a value of the wrong type.
    """
    if source.messages_field is not None:
        for msg in reversed(_messages(record, source, index)):
            if msg["role"] == "assistant":
                return msg["content"]
        return ""
    if source.prompt_field is not None:
        _as_text(record.get(source.prompt_field), source.prompt_field, source, index)
        return _as_text(record.get(source.response_field), source.response_field, source, index)  # type: ignore[arg-type]
    return _as_text(record.get(source.text_field), source.text_field, source, index)


def chat_messages(record: Mapping, source: DataSource, index: int = 0) -> tuple[list[dict], list[dict]]:
    """Split a chat record into ``(prompt_messages, full_messages)``; the last message of ``full`` is labelled.

    ``full`` ends with the last assistant turn (later turns are dropped); ``prompt`` is everything before it.
    Returns empty lists when the record has no assistant turn.
    """
    if source.messages_field is not None:
        msgs = _messages(record, source, index)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            return [], []
        full = msgs[: last + 1]
        if source.prompt_template is not None:
            user = max((i for i, m in enumerate(full[:-1]) if m["role"] == "user"), default=None)
            if user is None:
                raise DataError(
                    f"data source {source.label()}: record {index}: 'prompt_template' needs a user turn before the "
                    f"last assistant turn of field {source.messages_field!r}, found roles {[m['role'] for m in full]}"
                )
            full[user] = {**full[user], "content": apply_prompt_template(source.prompt_template, full[user]["content"])}
    else:
        prompt = _as_text(record.get(source.prompt_field), source.prompt_field, source, index)  # type: ignore[arg-type]
        response = _as_text(record.get(source.response_field), source.response_field, source, index)  # type: ignore[arg-type]
        prompt = apply_prompt_template(source.prompt_template, prompt)
        full = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if source.system_prompt is not None and full[0]["role"] != "system":
        full = [{"role": "system", "content": source.system_prompt}, *full]
    return full[:-1], full


def _columns(data: Any) -> list[str]:
    if hasattr(data, "column_names"):
        return list(data.column_names)
    return sorted({k for r in data for k in r})


def _matches(record: Mapping, wanted: Mapping) -> bool:
    return all(k in record and record[k] == v for k, v in wanted.items())


def _apply_filter(parts: list[tuple[Any, str]], source: DataSource) -> list[tuple[Any, str]]:
    """Keep the records of every part whose fields equal ``source.filter``; logs how many were dropped.

    Raises:
        DataError: a filter key is not a field of the data, or no record matches.
    """
    wanted = source.filter
    keys = list(wanted)
    out: list[tuple[Any, str]] = []
    total = kept = 0
    seen: dict[str, list] = {k: [] for k in keys}
    for data, where in parts:
        if len(data) == 0:
            out.append((data, where))
            continue
        columns = _columns(data)
        missing = [k for k in keys if k not in columns]
        if missing:
            kind = "key" if len(missing) == 1 else "keys"
            raise DataError(
                f"data source {source.label()}: filter {kind} {', '.join(repr(m) for m in missing)} "
                f"{'is not a field' if len(missing) == 1 else 'are not fields'} of {where}; "
                f"available fields: {sorted(columns)}"
            )
        if isinstance(data, list):
            rows: Iterator[Mapping] = iter(data)
        else:
            rows = (
                {k: batch[k][i] for k in keys}
                for batch in data.select_columns(keys).iter(batch_size=4096)
                for i in range(len(batch[keys[0]]))
            )
        indices = []
        for i, row in enumerate(rows):
            if _matches(row, wanted):
                indices.append(i)
            else:
                for k in keys:
                    value = row.get(k)
                    if len(seen[k]) < 5 and value not in seen[k]:
                        seen[k].append(value)
        total += len(data)
        kept += len(indices)
        if isinstance(data, list):
            out.append(([data[i] for i in indices], where))
        else:
            out.append((data.select(indices), where))
    dropped = total - kept
    if total and not kept:
        shown = "; ".join(f"{k!r} holds e.g. {seen[k]!r}" for k in keys)
        raise DataError(
            f"data source {source.label()}: no record matches filter {wanted!r} ({total} records read; "
            f"{shown}). Values must equal the field's exactly (true/false, numbers and strings differ)"
        )
    log.info(
        "data source %s: filter %r kept %d of %d records (dropped %d)",
        source.label(),
        wanted,
        kept,
        total,
        dropped,
    )
    return out


def _iter_rows(data: Any, lo: int, hi: int) -> Iterator[dict]:
    if isinstance(data, list):
        yield from data[lo:hi]
        return
    # Column batches are much faster than row-by-row access on a datasets.Dataset.
    for batch in data.select(range(lo, hi)).iter(batch_size=1024):
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            yield {k: batch[k][i] for k in keys}


def _locate(where: str, row: int) -> str:
    """``"<file>: line N"`` of record ``row`` (0-based) of a local JSON Lines / CSV file; else ``where`` and the
    record number (JSON arrays, parquet, hub datasets)."""
    path = Path(where)
    try:
        if path.is_file():
            fmt = _format_of(path)
            if fmt == "json" and _json_layout(path)[0] == "jsonl":
                fmt = "jsonl"
            if fmt == "jsonl":
                with _open_text(path) as fh:
                    seen = -1
                    for lineno, line in enumerate(fh, start=1):
                        if line.strip():
                            seen += 1
                            if seen == row:
                                return f"{path}: line {lineno}"
            if fmt == "csv":
                with _open_text(path) as fh:
                    reader = csv.reader(fh)
                    next(reader, None)  # the header
                    for i, _ in enumerate(reader):
                        if i == row:
                            return f"{path}: line {reader.line_num}"
            if fmt == "text":
                return f"{path}: record {row + 1}"
    except (OSError, UnicodeDecodeError, csv.Error, DataError):
        pass
    return f"{where}: record {row + 1}"


def load_records(source: Union[DataSource, Mapping, str]) -> list[dict]:
    """Read a data source into a list of records (dicts with all of the source's fields).

    Steps: read (hub, local file or folder, synthetic) → check the configured fields exist → ``filter`` (the
    count dropped is logged) → ``select`` → drop records whose text is shorter than ``min_chars`` (the count is
    logged as a warning) → ``limit``.

    Args:
        source: a :class:`DataSource`, a mapping of its fields, or a path.

    Returns:
        The records in source order.

    Raises:
        DataError: missing file, unreadable or malformed file (with the line number for JSON), missing field
            or filter key (the message lists the fields that exist), no records left.
        ConfigError: invalid source settings.
    """
    source = as_source(source)
    parts = _read_raw(source)
    for data, where in parts:
        if len(data) == 0:
            continue
        _check_columns(_columns(data), source, where)
    if source.filter:
        parts = _apply_filter(parts, source)

    total = sum(len(data) for data, _ in parts)
    if total == 0:
        raise DataError(f"data source {source.label()}: no records found")
    keep = select_range(source.select, total, source.path)
    if len(keep) == 0:
        raise DataError(
            f"data source {source.label()}: 'select' {source.select!r} keeps none of the {total} records"
        )

    records: list[dict] = []
    dropped = 0
    offset = 0
    done = False
    for data, _where in parts:
        n = len(data)
        lo, hi = max(keep.start - offset, 0), min(keep.stop - offset, n)
        offset += n
        if lo >= hi:
            continue
        for k, row in enumerate(_iter_rows(data, lo, hi)):
            index = offset - n + lo + k
            try:
                text = source_text(row, source, index)
            except DataError as e:
                reason = re.sub(r"^data source .+?: record \d+: ", "", str(e))
                raise DataError(f"{_locate(_where, lo + k)}: {reason}") from None
            if len(text) < source.min_chars:
                dropped += 1
                continue
            records.append(dict(row))
            if source.limit is not None and len(records) >= source.limit:
                done = True
                break
        if done:
            break
    if dropped:
        log.warning(
            "data source %s: dropped %d of %d records whose text is shorter than min_chars=%d (field %s)",
            source.label(),
            dropped,
            len(keep),
            source.min_chars,
            ", ".join(repr(f) for f in source.required_fields),
        )
    if not records:
        raise DataError(
            f"data source {source.label()}: no records left after filtering ({len(keep)} selected, {dropped} "
            f"shorter than min_chars={source.min_chars})"
        )
    return records
