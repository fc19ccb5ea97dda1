"""``tar-lightning evaluate``: multiple-choice accuracy of a model on WMDP / MMLU tasks.

Progress (forward batches done of the true total, per task and setting) goes to stderr: a bar on a terminal,
plain lines (no carriage returns or escape codes) when stderr is a file or a pipe.

Example::

    tar-lightning evaluate --model smollm2-135m-instruct --tasks wmdp_bio,mmlu \\
        --data-root data --limit 200 --variants letter,cloze --chat-template both --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from tar_lightning.errors import ConfigError, DataError, TARLightningError

__all__ = ["build_parser", "evaluate_main", "format_table"]

_CHAT = {"off": [False], "on": [True], "both": [False, True]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tar-lightning evaluate",
        description=(
            "Multiple-choice accuracy (lm-evaluation-harness 0.4 zero-shot format) on WMDP / MMLU tasks: "
            "wmdp_bio, wmdp_chem, wmdp_cyber, mmlu, mmlu_<subject>."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="model source: tiny, smollm2-135m-instruct, a folder, ..."
    )
    parser.add_argument("--tokenizer", default=None, help="load the tokenizer from this source instead")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. wmdp_bio,mmlu")
    parser.add_argument(
        "--data-root",
        default=None,
        help="data folder laid out as wmdp/wmdp-<bio|chem|cyber>-questions.json, mmlu/test/<subject>_test.csv; default $TAR_LIGHTNING_DATA, "
        "else the Hugging Face hub (cais/wmdp, cais/mmlu)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N questions of each task (of each subject for mmlu)",
    )
    parser.add_argument(
        "--variants", default="letter", help="comma-separated: letter, cloze (default letter)"
    )
    parser.add_argument(
        "--chat-template",
        choices=sorted(_CHAT),
        default="off",
        help="apply the tokenizer's chat template: off (the lm-eval standard), on, or both",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="also evaluate with this system prompt (every setting is then run with and without it)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument(
        "--max-length", type=int, default=None, help="left-truncate inputs to this many tokens"
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument(
        "--out", default=None, help="write all results, with per-question records, to this JSON"
    )
    return parser


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


def _run(args: argparse.Namespace) -> int:
    from tar_lightning.evaluation.mcq import MCQ_VARIANTS, evaluate_mcq_task, get_task, resolve_task
    from tar_lightning.evaluation.progress import quiet_hf_progress
    from tar_lightning.models import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks: give at least one task name, got {args.tasks!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in MCQ_VARIANTS]
    if bad or not variants:
        raise ConfigError(
            f"--variants: expected a comma-separated subset of {list(MCQ_VARIANTS)}, got {args.variants!r}"
        )
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
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
        from tar_lightning.checkpoint import atomic_write_text

        atomic_write_text(args.out, json.dumps(payload, indent=1), what="evaluation results")
        print(f"wrote {args.out}")
    return 0


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``tar-lightning evaluate`` with ``argv`` (without the ``evaluate`` word); returns the exit code.

    Errors the user can cause (unknown task, missing data, bad model source) print one line and return 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        return _run(args)
    except TARLightningError as e:
        print(f"tar-lightning evaluate: error: {e}", file=sys.stderr)
        return 2
