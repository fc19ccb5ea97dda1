"""``tar-lightning redteam``: run a red-team suite on a checkpoint from the command line.

Example::

    tar-lightning redteam --model runs/tiny/export --suite durability --scale 0.01 --seeds 2 \\
        --attacks d01,d05 --data forget=/data/forget.jsonl --out runs/redteam/durability
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Optional

from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.evaluation.suite import TRUST_CALLABLE_FLAG

__all__ = ["build_parser", "parse_data_overrides", "redteam_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tar-lightning redteam",
        description="Attack a model with every fine-tuning attack of a red-team suite and report the results.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model source: a Hugging Face folder (e.g. from tar-lightning export), a hub id, a .gguf file, "
        "smollm2-135m-instruct, or tiny",
    )
    parser.add_argument(
        "--suite",
        required=True,
        help="suite YAML file, or a shipped suite name: weaponization, durability, refusal",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (results.json, results.csv, report.md, plots)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrink steps, warmup, eval cadence and batch sizes by this factor (e.g. 0.01 on a CPU)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per attack (default: the suite's)")
    parser.add_argument("--attacks", default=None, help="comma-separated attack ids to run (default: all)")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="REGIME=SOURCE",
        help="replace a data regime: REGIME=PATH, or REGIME={path: ..., text_field: ...} (YAML); repeatable",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="cap every attack's steps (after scaling)"
    )
    parser.add_argument(
        "--device", default=None, help="device of the runs (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--devices",
        default=None,
        help="comma-separated devices to run attacks on concurrently (default: all CUDA devices)",
    )
    parser.add_argument(
        "--dtype", default=None, help="load the model in this dtype (float32, bfloat16, float16)"
    )
    parser.add_argument("--tokenizer", default=None, help="load the tokenizer from this source instead")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for tiny models on a shared machine)")
    parser.add_argument("--no-resume", action="store_true", help="recompute runs whose result files exist")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of another model found in --out (without it such an --out is "
                             "refused; results of the same model are resumed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(TRUST_CALLABLE_FLAG, dest="trust_callable", action="store_true",
                        help="run the suite's 'kind: callable' metrics, which import and call the Python function "
                             "the suite file names (without it such a suite is refused)")
    return parser


def parse_data_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["forget=/x.jsonl", "ood={path: y.json, text_field: body}"]`` -> regime -> path or fields.

    Raises:
        ConfigError: an item without ``=`` or with an unparsable YAML mapping.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"--data {item!r}: expected REGIME=PATH or REGIME={{path: ..., ...}}")
        value = value.strip()
        if value.startswith("{"):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"--data {item!r}: cannot parse the source fields as YAML: {err}") from err
            if not isinstance(parsed, dict):
                raise ConfigError(f"--data {item!r}: expected a mapping of DataSource fields")
            out[name.strip()] = parsed
        else:
            out[name.strip()] = value
    return out


def redteam_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tar-lightning redteam``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        from tar_lightning.evaluation.redteam import run_redteam
        from tar_lightning.models import ModelSource

        model = ModelSource(args.model, dtype=args.dtype or "float32", tokenizer=args.tokenizer)
        attacks = [a for a in args.attacks.split(",") if a.strip()] if args.attacks else None
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
        result = run_redteam(
            model,
            args.suite,
            out_dir=args.out,
            scale=args.scale,
            seeds=args.seeds,
            attacks=attacks,
            data=parse_data_overrides(args.data),
            max_steps=args.max_steps,
            device=args.device,
            devices=devices,
            resume=not args.no_resume,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            trust_callable=args.trust_callable,
        )
    except TARLightningError as err:
        print(f"tar-lightning redteam: error: {err}", file=sys.stderr)
        return 2
    agg = result.aggregate
    safety = result.suite.evaluation.safety
    print(
        f"red team {result.suite.name!r}: {len(result.runs)} runs ({len(result.computed)} computed) -> {result.out_dir}"
    )
    print(
        f"  {safety.metric} after: suite mean {_num(agg['suite_mean'])}, worst {_num(agg['worst_case']['safety_after'])} "
        f"({agg['worst_case']['attack']}), bounded worst {_num(agg['bounded_worst_case']['safety_after'])} "
        f"({agg['bounded_worst_case']['attack']})"
    )
    if "report.md" in result.files:
        print(f"  report: {result.files['report.md']}")
    return 0


def _num(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(redteam_main())
