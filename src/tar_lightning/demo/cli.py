"""``tar-lightning demo``: the end-to-end demo on the invented knowledge world (see :mod:`tar_lightning.demo`).

    tar-lightning demo [--size default|minimal|smollm2] [--model tiny|smollm2-135m-instruct] [--out runs/demo]
                       [--seeds 0,1,2] [--config FILE ...] [--SECTION.KEY VALUE ...] [--print_config]

The options are the fields of :class:`~tar_lightning.demo.config.DemoConfig` (the shipped
``recipes/demo/default.yaml`` with every field commented): ``--threads 2``, ``--redteam.seeds 3``,
``--tar.steps 50``. ``--config`` files merge over the shipped configuration in order (a full demo file with its own
``sizes`` replaces the shipped presets); the size preset sits between the full files and the rest
(:func:`~tar_lightning.demo.config.demo_config_from_layers`). Rerunning the same command reuses every finished stage
in ``--out``. ``--seeds 0,1,2`` runs the whole demo once per training seed into ``OUT/seed<N>`` and writes the
mean ± spread over them to ``OUT`` (:func:`~tar_lightning.demo.run.run_seeds`; ``seed`` is then not used); 0.1's
``--seeds N`` (a count) still means ``--redteam.seeds N`` with a warning. Exit codes: 0 done, 2 bad configuration,
1 another library error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from tar_lightning.command import Command, Deprecated, parse_command
from tar_lightning.demo.config import DEFAULT_CONFIG, DemoConfig, demo_config_from_layers
from tar_lightning.demo.report import SeedsResult
from tar_lightning.demo.run import run_demo
from tar_lightning.errors import ConfigError, TARLightningError

__all__ = ["DEMO", "demo_main"]

DEMO = Command(
    name="demo",
    description="Teach a tiny model two invented domains, safeguard one (random mapping, TAR with two adversary "
    "families), red-team every defense and write report.md + results.json. No network, no GPU. Sizes: default "
    "(8-15 min on 2 CPU cores), minimal (under a minute), smollm2 (the real SmolLM2-135M-Instruct, chosen by "
    "--model smollm2-135m-instruct).",
    options=DemoConfig,
    base=DEFAULT_CONFIG,
    resolve=demo_config_from_layers,
    deprecated={
        "--no-progress": Deprecated("progress", value=False),
        # 0.1's --seeds N (N attack seeds) is read by demo_config_from_layers: --seeds now lists training seeds
    },
    notes=(
        "Nested options take dotted keys: --stage0.steps 100, --tar.inner_steps 8, --redteam.seeds 3.",
        "Over training seeds: --seeds 0,1,2 (runs OUT/seed0, seed1, seed2 and the mean ± spread in OUT; rerunning "
        "it reuses every finished stage, so it only aggregates).",
        "tar-lightning demo --size minimal --print_config shows every value (the shipped file comments each one).",
    ),
)


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tar-lightning demo``; returns the exit code."""
    try:
        parsed = parse_command(DEMO, list(sys.argv[1:] if argv is None else argv))
        if parsed.exit_code is not None:
            return parsed.exit_code
        config = parsed.options
        print(f"[demo] model {config.model}, size preset {config.size}, output {config.out}", flush=True)
        result = run_demo(config)
    except ConfigError as err:
        print(f"tar-lightning demo: error: {err}", file=sys.stderr)
        return 2
    except TARLightningError as err:
        print(f"tar-lightning demo: error: {err}", file=sys.stderr)
        return 1
    print(f"[demo] done in {result.wall_time_s:.0f} s: {result.files['report.md']}")
    if isinstance(result, SeedsResult):
        agg = result.aggregate
        for defense, s in agg["summary"].items():
            print(
                f"[demo] {defense:>16}: facts-B acc before {_pm(agg['before'][defense]['before'])}, after attacks "
                f"mean {_pm(s['mean'])}, worst {_pm(s['worst'])} (mean ± std over training seeds {agg['training_seeds']})"
            )
        return 0
    for defense, s in result.summary.items():
        print(
            f"[demo] {defense:>16}: facts-B acc before {_f(s['before'])}, after attacks mean {_f(s['mean'])}, "
            f"worst {_f(s['worst']['safety_after'])} ({s['worst']['attack']})"
        )
    return 0


def _f(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def _pm(stats) -> str:
    return _f(stats["mean"]) + ("" if stats["std"] is None else f" ± {stats['std']:.2f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(demo_main())
