"""``tar-lightning evaluate``: multiple-choice accuracy of a model on WMDP / MMLU tasks.

Progress (forward batches done of the true total, per task and setting) goes to stderr: a bar on a terminal,
plain lines (no carriage returns or escape codes) when stderr is a file or a pipe.

Example::

    tar-lightning evaluate --model smollm2-135m-instruct --tasks wmdp_bio,mmlu \\
        --data_root data --limit 200 --variants letter,cloze --chat_template both --out results.json

Options are the fields of :class:`EvaluateOptions`, given as flags, in ``--config`` files, or both
(:mod:`tar_lightning.command`); ``--print_config`` prints them resolved.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tar_lightning.checkpoint import atomic_write_text
from tar_lightning.command import Command, Deprecated, name_list, parse_command
from tar_lightning.errors import ConfigError, DataError, TARLightningError
from tar_lightning.evaluation.mcq import MCQ_VARIANTS, evaluate_mcq_task, get_task, resolve_task
from tar_lightning.evaluation.progress import quiet_hf_progress
from tar_lightning.models import load_model
from tar_lightning.schema import positive_int_or_none

__all__ = ["EVALUATE", "EvaluateOptions", "evaluate_main", "format_table"]

_CHAT = {"off": [False], "on": [True], "both": [False, True]}


@dataclass
class EvaluateOptions:
    """Options of ``tar-lightning evaluate``."""

    model: str = field(metadata={"help": "model source: tiny, smollm2-135m-instruct, a folder, ..."})
    tasks: list[str] = field(metadata={"coerce": name_list,
                                       "help": "task names: [wmdp_bio, mmlu] or wmdp_bio,mmlu"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "load the tokenizer from this source instead"})
    data_root: Optional[str] = field(default=None, metadata={
        "help": "data folder laid out as wmdp/wmdp-<bio|chem|cyber>-questions.json, mmlu/test/<subject>_test.csv "
                "(null: $TAR_LIGHTNING_DATA, else the Hugging Face hub: cais/wmdp, cais/mmlu)"})
    limit: Optional[int] = field(default=None, metadata={
        "coerce": positive_int_or_none, "help": "score only the first N questions of each task (of each subject for mmlu)"})
    variants: list[str] = field(default_factory=lambda: ["letter"], metadata={
        "coerce": name_list, "help": f"prompt variants among {list(MCQ_VARIANTS)}"})
    chat_template: str = field(default="off", metadata={
        "help": "apply the tokenizer's chat template: off (the lm-eval standard), on, or both"})
    system_prompt: Optional[str] = field(default=None, metadata={
        "help": "also evaluate with this system prompt (every setting is then run with and without it)"})
    batch_size: int = field(default=16, metadata={"coerce": positive_int_or_none, "help": "sequences per forward pass"})
    max_length: Optional[int] = field(default=None, metadata={
        "coerce": positive_int_or_none, "help": "left-truncate inputs to this many tokens"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    out: Optional[str] = field(default=None, metadata={
        "help": "write all results, with per-question records, to this JSON"})


EVALUATE = Command(
    name="evaluate",
    description="Multiple-choice accuracy (lm-evaluation-harness 0.4 zero-shot format) on WMDP / MMLU tasks: "
    "wmdp_bio, wmdp_chem, wmdp_cyber, mmlu, mmlu_<subject>.",
    options=EvaluateOptions,
    deprecated={flag: Deprecated(flag[2:].replace("-", "_"))
                for flag in ("--data-root", "--chat-template", "--system-prompt", "--batch-size", "--max-length")},
)


def format_table(results: dict) -> str:
    """A plain-text table of ``{task: evaluate_mcq_task(...)}``: task, setting, accuracy, acc_norm, n, histogram."""
    rows = [("task", "setting", "accuracy", "acc_norm", "n", "predicted A/B/C/D...")]
    for task, res in results.items():
        for setting, r in res["results"].items():
            hist = " ".join(f"{k}:{v:.2f}" for k, v in r["pred_histogram"].items())
            norm = "" if r["acc_norm"] is None else f"{r['acc_norm']:.4f}"
            rows.append((task, setting, f"{r['accuracy']:.4f}", norm, str(r["n"]), hist))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run(args: EvaluateOptions) -> int:
    tasks = args.tasks
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    variants = args.variants or []
    bad = [v for v in variants if v not in MCQ_VARIANTS]
    if bad or not variants:
        raise ConfigError(f"--variants: expected a subset of {list(MCQ_VARIANTS)}, got {args.variants!r}")
    if args.chat_template not in _CHAT:
        raise ConfigError(f"--chat_template: expected one of {sorted(_CHAT)}, got {args.chat_template!r}")
    for task in tasks:  # fail on a typo or missing data before loading the model
        get_task(task)
    for task in tasks:
        resolve_task(task, args.data_root)
    if args.out is not None:
        out = Path(args.out)
        if out.parent and not out.parent.exists():
            raise DataError(f"--out: the folder {out.parent} does not exist")

    kwargs = {"tokenizer": args.tokenizer} if args.tokenizer else {}
    with quiet_hf_progress(unless_terminal=True):  # transformers' loading bars: escape codes in a log file
        model, tokenizer = load_model(args.model, dtype=args.dtype, **kwargs)
    systems = [None] if args.system_prompt is None else [None, args.system_prompt]
    results = {}
    for task in tasks:
        res = evaluate_mcq_task(
            model,
            tokenizer,
            task,
            data_root=args.data_root,
            limit=args.limit,
            variants=variants,
            chat_template=_CHAT[args.chat_template],
            system_prompt=systems,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=True,
        )
        results[res["task"]] = res
    print(format_table(results))
    if args.out is not None:
        payload = {
            "model": args.model,
            "tokenizer": args.tokenizer,
            "dtype": args.dtype,
            "data_root": args.data_root or os.environ.get("TAR_LIGHTNING_DATA"),
            "limit": args.limit,
            "variants": variants,
            "chat_template": args.chat_template,
            "system_prompt": args.system_prompt,
            "tasks": results,
        }
        atomic_write_text(args.out, json.dumps(payload, indent=1), what="evaluation results")
        print(f"wrote {args.out}")
    return 0


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``tar-lightning evaluate`` with ``argv`` (without the ``evaluate`` word); returns the exit code.

    Errors the user can cause (unknown task, missing data, bad model source, a bad option) print one line and
    return 2.
    """
    try:
        parsed = parse_command(EVALUATE, list(sys.argv[1:] if argv is None else argv))
        if parsed.exit_code is not None:
            return parsed.exit_code
        return _run(parsed.options)
    except TARLightningError as e:
        print(f"tar-lightning evaluate: error: {e}", file=sys.stderr)
        return 2
