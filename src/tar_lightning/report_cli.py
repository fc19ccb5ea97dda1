"""``tar-lightning report``: plots and a Markdown summary of a TAR run's logs (the paper's Figure 3).

Example::

    tar-lightning fit --config recipes/tiny/tar.yaml
    tar-lightning report --run runs/tiny/tar            # -> runs/tiny/tar/report/{report.md, *.png}

Options are the fields of :class:`ReportOptions`, given as flags, in ``--config`` files, or both
(:mod:`tar_lightning.command`); ``--print_config`` prints them resolved. The work is
:func:`tar_lightning.evaluation.training_report.training_report`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from tar_lightning.command import Command, parse_command
from tar_lightning.errors import TARLightningError
from tar_lightning.evaluation.training_report import training_report

__all__ = ["REPORT", "ReportOptions", "report_main"]


@dataclass
class ReportOptions:
    """Options of ``tar-lightning report``."""

    run: str = field(metadata={"help": "the run folder (its --trainer.default_root_dir), a log folder, a "
                                       "metrics.csv or a TensorBoard event file"})
    out: Optional[str] = field(default=None, metadata={
        "help": "folder for the plots and report.md (null: <run>/report)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the report in a non-empty --out (without it such an --out is refused)"})
    plots: bool = field(default=True, metadata={"help": "write the PNG plots (they also need matplotlib)"})


REPORT = Command(
    name="report",
    description="Plot a TAR run's logs: the adversary's loss at each inner step across outer steps, the TR loss "
                "and entropy at each evaluation point, the retain loss and the persistent pool; and a Markdown "
                "summary.",
    options=ReportOptions,
)


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tar-lightning report``; returns the exit code (2 on bad input)."""
    try:
        parsed = parse_command(REPORT, list(sys.argv[1:] if argv is None else argv))
        if parsed.exit_code is not None:
            return parsed.exit_code
        args: ReportOptions = parsed.options
        report = training_report(args.run, args.out, overwrite=args.overwrite, plots=args.plots)
    except TARLightningError as err:
        print(f"tar-lightning report: error: {err}", file=sys.stderr)
        return 2
    plots = sum(1 for name in report.files if name != "report.md")
    print(f"training report of {args.run}: {len(report.adv_steps)} outer steps with per-k adversary losses, "
          f"K = {len(report.adv_k)}; {plots} plot(s) -> {report.out_dir}")
    print(f"  report: {report.files['report.md']}")
    for line in report.missing:
        print(f"  not in the log: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(report_main())
