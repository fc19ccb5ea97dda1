"""The red team's files: JSON text, configuration hashes, run files, and the output folder's ownership.

- :func:`json_text`: the JSON form of run records (paths, numpy numbers, tuples and dataclasses as plain values,
  :func:`tar_lightning.common.json_default`; the configuration key is :func:`tar_lightning.common.config_hash`);
- :func:`write_text`: every red-team result file goes through :func:`tar_lightning.checkpoint.atomic_write_text`
  (the library's one atomic writer);
- :func:`load_finished`: a finished run file of the same configuration (resume);
- :func:`claim_out_dir`: refuses (or, with ``overwrite``, clears) an output folder holding another model's results.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from tar_lightning.checkpoint import atomic_write_text
from tar_lightning.common import json_default
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.redteam.result import RESULT_VERSION
from tar_lightning.evaluation.refusal import AGREEMENT_TABLE

__all__ = [
    "SUMMARY_FILES",
    "claim_out_dir",
    "describe_model",
    "json_text",
    "load_finished",
    "write_text",
]

log = logging.getLogger(__name__)

#: what ``report.write_results`` writes for the folder as a whole (replaced when its runs are another model's)
SUMMARY_FILES = ("results.json", "results.csv", "report.md")


def write_text(path: Path, text: str) -> None:
    """A result file, atomically and with the umask's permissions (the library's one atomic writer)."""
    atomic_write_text(path, text, what="red-team result")


def json_text(value: Any) -> str:
    """``value`` as the indented JSON of run files and results.json (see :func:`json_default`)."""
    return json.dumps(value, indent=1, sort_keys=False, default=json_default)


def describe_model(identity: Mapping[str, Any]) -> str:
    """A model identity (as run files record it) in words."""
    if "source" in identity:
        return f"{identity['source']} ({identity.get('dtype')})"
    return f"a {identity.get('module')} module (weights {identity.get('weights')})"


def claim_out_dir(out: Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """Refuses an output folder holding red-team results of another model (its run files or results.json name a
    different model identity); with ``overwrite`` deletes them instead. Results of the same model are kept
    (resumed); run files that name no model (older versions) are left to the configuration-hash check.

    Raises:
        ConfigError: ``out`` holds another model's results and ``overwrite`` is false.
    """
    identity = json.loads(json_text(identity))  # as the files hold it (tuples are lists)
    found: dict[Path, Any] = {}
    runs = sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
    for path in runs + [out / "results.json"]:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: load_finished reports it and runs it again
        model = record.get("summary", {}).get("model") if path.name == "results.json" else record.get("model")
        if isinstance(model, dict) and model != identity:
            found[path] = model
    if not found:
        return
    if not overwrite:
        first = next(iter(found.values()))
        raise ConfigError(
            f"{out} holds red-team results of another model ({describe_model(first)}, {len(found)} file(s), "
            f"e.g. {next(iter(found))}), not of {describe_model(identity)}: choose another --out, or pass "
            "--overwrite (overwrite=True) to replace them"
        )
    for path in found:
        path.unlink(missing_ok=True)
    if out / "results.json" in found:
        for name in SUMMARY_FILES:
            (out / name).unlink(missing_ok=True)
    log.info("red team: removed %d result file(s) of another model from %s (overwrite)", len(found), out)


def judge_agreement_problem(record: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a run record's ``judge_agreement`` (absent is fine: runs without a second judge, or
    written before it existed), or ``None``: every entry (``before`` / ``after``: metric -> entry; ``during``:
    ``[step, {metric: entry}]`` pairs) must hold the 2×2 counts :data:`AGREEMENT_TABLE` as integers >= 0."""
    found = record.get("judge_agreement")
    if found is None:
        return None
    if not isinstance(found, Mapping):
        return f"judge_agreement is {type(found).__name__}, expected a mapping"
    parts: list[tuple[str, Any]] = [(p, found[p]) for p in ("before", "after") if p in found]
    during = found.get("during", [])
    if not isinstance(during, list):
        return "judge_agreement.during is not a list of [step, metrics] pairs"
    for i, pair in enumerate(during):
        if not (isinstance(pair, list) and len(pair) == 2):
            return f"judge_agreement.during[{i}] is not a [step, metrics] pair"
        parts.append((f"during[{i}]", pair[1]))
    for where, metrics in parts:
        if not isinstance(metrics, Mapping):
            return f"judge_agreement.{where} is not a mapping of metric -> agreement"
        for metric, entry in metrics.items():
            bad = [c for c in AGREEMENT_TABLE if not isinstance(entry, Mapping) or isinstance(entry.get(c), bool)
                   or not isinstance(entry.get(c), int) or entry.get(c) < 0]
            if bad:
                return (f"judge_agreement.{where}.{metric} lacks the 2x2 counts {bad} (integers >= 0 expected: "
                        f"{', '.join(AGREEMENT_TABLE)})")
    return None


def load_finished(path: Path, config_hash: str) -> Optional[dict]:
    """The run record in ``path`` if it was written for ``config_hash`` (and this file format) and its
    ``judge_agreement`` is whole (:func:`judge_agreement_problem`), else ``None`` (the run is done again)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("red team: ignoring unreadable run file %s (%s); running it again", path, err)
        return None
    if record.get("config_hash") != config_hash or record.get("version") != RESULT_VERSION:
        log.info("red team: %s was written for another configuration; running it again", path.name)
        return None
    problem = judge_agreement_problem(record)
    if problem:
        log.warning("red team: %s: %s; running it again", path, problem)
        return None
    return record
