"""``tar-lightning redteam``: run a red-team suite on a checkpoint from the command line.

Example::

    tar-lightning redteam --model runs/tiny/export --suite durability --scale 0.01 --seeds 2 \\
        --attacks d01,d05 --data.forget /data/forget.jsonl --out runs/redteam/durability

Options are the fields of :class:`RedTeamOptions`, given as flags, in ``--config`` files, or both
(:mod:`tar_lightning.command`); ``--print_config`` prints them resolved.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from tar_lightning.command import Command, Deprecated, name_list, parse_command
from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.evaluation.redteam import run_redteam
from tar_lightning.models import ModelSource
from tar_lightning.resources import shipped_names
from tar_lightning.schema import positive_int_or_none

__all__ = ["REDTEAM", "RedTeamOptions", "redteam_main"]


def _data(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, dict)) for v in value.values()):
        raise ConfigError(f"{where} must map regime names to a path or DataSource fields "
                          f"(--data.forget /x.jsonl or --data.forget '{{path: x.json, text_field: body}}'), "
                          f"got {value!r}")
    return dict(value)


@dataclass
class RedTeamOptions:
    """Options of ``tar-lightning redteam``."""

    model: str = field(metadata={"help": "model source: a Hugging Face folder (e.g. from tar-lightning export), a "
                                         "hub id, a .gguf file, smollm2-135m-instruct, or tiny"})
    suite: str = field(metadata={"help": "suite YAML file, or a shipped suite: "
                                         + ", ".join(shipped_names("recipes/redteam"))})
    out: str = field(metadata={"help": "output folder (results.json, results.csv, report.md, plots)"})
    scale: float = field(default=1.0, metadata={
        "help": "shrink steps, warmup, eval cadence and batch sizes by this factor (e.g. 0.01 on a CPU)"})
    seeds: Optional[int] = field(default=None, metadata={"help": "seeds per attack (null: the suite's)"})
    attacks: Union[None, str, list[str]] = field(default=None, metadata={
        "coerce": name_list, "help": "attack ids to run: [w01, w02] or w01,w02 (null: all)"})
    data: dict = field(default_factory=dict, metadata={
        "coerce": _data, "help": "replace data regimes: --data.REGIME PATH or --data.REGIME '{path: ..., text_field: ...}'"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "cap every attack's steps (after scaling)"})
    device: Optional[str] = field(default=None, metadata={
        "help": "device of the runs (null: cuda if available, else cpu)"})
    devices: Union[None, str, list[str]] = field(default=None, metadata={
        "coerce": name_list, "help": "devices to run attacks on concurrently: [cuda:0, cuda:1] (null: all CUDA devices)"})
    dtype: str = field(default="float32", metadata={"help": "load the model in this dtype (float32, bfloat16, "
                                                            "float16)"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "load the tokenizer from this source instead"})
    micro_batch_size: Optional[int] = field(default=None, metadata={
        "coerce": positive_int_or_none, "help": "run each attack step's batch in parts of at most this many rows, "
        "accumulating the gradient (the same update, less activation memory; null: the whole batch)"})
    threads: Optional[int] = field(default=None, metadata={
        "coerce": positive_int_or_none, "help": "torch CPU threads (1 is fastest for tiny models on a shared machine)"})
    resume: bool = field(default=True, metadata={"help": "reuse runs whose result files exist in --out"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the results of another model found in --out (without it such an --out is refused)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    trust_callable_metrics: bool = field(default=False, metadata={
        "help": "run the suite's 'kind: callable' metrics, which import and call the Python function the suite "
                "file names (without it such a suite is refused)"})


REDTEAM = Command(
    name="redteam",
    description="Attack a model with every attack of a red-team suite (fine-tuning, sweeps, activation perturbations, refusal ablation) and report the results.",
    options=RedTeamOptions,
    deprecated={
        "--max-steps": Deprecated("max_steps"),
        "--no-resume": Deprecated("resume", value=False),
        "--no-progress": Deprecated("progress", value=False),
        "--trust-callable-metrics": Deprecated("trust_callable_metrics", value=True),
        "--data": Deprecated("data", mapping=True),
    },
)


def redteam_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tar-lightning redteam``; returns the exit code (2 on bad input)."""
    try:
        parsed = parse_command(REDTEAM, list(sys.argv[1:] if argv is None else argv))
        if parsed.exit_code is not None:
            return parsed.exit_code
        args: RedTeamOptions = parsed.options
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model = ModelSource(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
        result = run_redteam(
            model,
            args.suite,
            out_dir=args.out,
            scale=args.scale,
            seeds=args.seeds,
            attacks=args.attacks,
            data=args.data,
            max_steps=args.max_steps,
            device=args.device,
            devices=args.devices,
            resume=args.resume,
            progress=args.progress,
            overwrite=args.overwrite,
            trust_callable=args.trust_callable_metrics,
            micro_batch_size=args.micro_batch_size,
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
