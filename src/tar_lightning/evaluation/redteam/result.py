"""What a red team returns: :class:`RedTeamResult`, and :data:`RESULT_VERSION` of the run files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tar_lightning.evaluation.suite import Suite

__all__ = ["RESULT_VERSION", "RedTeamResult"]

#: format version of run files and results.json; a run file of another version is run again
RESULT_VERSION = 1


@dataclass
class RedTeamResult:
    """What :func:`~tar_lightning.evaluation.redteam.run_redteam` returns (everything is also on disk under
    ``out_dir``).

    Attributes:
        suite: the suite as run (scaled, seeds and data overrides applied).
        runs: every run record (attack, seed, before, after, trajectory, config, ...), in suite order.
        aggregate: :func:`tar_lightning.evaluation.aggregate.aggregate` of the runs.
        out_dir: the output folder.
        files: name -> path of results.json, results.csv, report.md and the plots.
        computed: keys (``<attack>__seed<k>``) of the runs executed by this call (the others were resumed).
    """

    suite: Suite
    runs: list[dict]
    aggregate: dict
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)

    def run(self, attack: str, seed: int) -> dict:
        for r in self.runs:
            if r["attack"] == attack and r["seed"] == seed:
                return r
        raise KeyError(f"no run of attack {attack!r} with seed {seed}")
