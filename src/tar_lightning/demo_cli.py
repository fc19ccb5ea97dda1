"""``tar-lightning demo``: the end-to-end demo on the invented knowledge world (see :mod:`tar_lightning.demo`).

    tar-lightning demo [--config recipes/demo/default.yaml] [--out runs/demo] [--model tiny|smollm2-135m-instruct]
                       [--size default|minimal|smollm2] [--seeds N] [--threads 1] [--workers 2]
                       [--no-progress]

Rerunning the same command reuses every finished stage in ``--out``. Exit codes: 0 done, 2 bad configuration,
1 another library error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

__all__ = ["build_parser", "demo_main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tar-lightning demo",
        description="Teach a tiny model two invented domains, safeguard one (random mapping, TAR with two "
        "adversary families), red-team every defense and write report.md + results.json. No network, no GPU.",
    )
    p.add_argument("--config", default=None, help="demo YAML (default: recipes/demo/default.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: the config's, runs/demo)")
    p.add_argument("--model", default=None, help="'tiny' (default) or a model source, e.g. smollm2-135m-instruct")
    p.add_argument("--size", default=None, help="size preset: default (~15 min on 2 CPU cores), minimal (<1 min) or smollm2 "
                   "(chosen by --model smollm2-135m-instruct)")
    p.add_argument("--seeds", type=int, default=None, help="red-team seeds per attack (default: the config's, 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the config's, 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running independent stages and attacks at once (default: the config's, 2; "
                   "the numbers do not depend on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tar-lightning demo``; returns the exit code."""
    from tar_lightning.errors import ConfigError, TARLightningError

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    overrides: dict = {}
    if args.out is not None:
        overrides["out"] = args.out
    if args.model is not None:
        overrides["model"] = args.model
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.seeds is not None:
        overrides["redteam"] = {"seeds": args.seeds}
    if args.no_progress:
        overrides["progress"] = False
    try:
        from tar_lightning.demo import load_demo_config, run_demo

        config = load_demo_config(args.config, size=args.size, overrides=overrides)
        print(f"[demo] model {config.model}, size preset {config.size}, output {config.out}", flush=True)
        result = run_demo(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TARLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"[demo] done in {result.wall_time_s:.0f} s: {result.files['report.md']}")
    for defense, s in result.summary.items():
        print(
            f"[demo] {defense:>16}: facts-B acc before {_f(s['before'])}, after attacks mean {_f(s['mean'])}, "
            f"worst {_f(s['worst']['safety_after'])} ({s['worst']['attack']})"
        )
    return 0


def _f(v) -> str:
    return "—" if v is None else f"{v:.2f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(demo_main())
