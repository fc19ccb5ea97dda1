"""What a red team returns: :class:`RedTeamResult`, :data:`RESULT_VERSION` of the run files, and which adversary
methods train with an optimizer (what a run record and the report may show for them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tar_lightning.evaluation.suite import Suite

__all__ = ["NO_OPTIMIZER_METHODS", "OPTIMIZER_FIELDS", "RADIUS_LR_METHODS", "RESULT_VERSION", "RedTeamResult"]

#: format version of run files and results.json; a run file of another version is run again
RESULT_VERSION = 1

#: adversary methods that train nothing: no optimizer, learning rate, schedule or optimizer steps. Their run records
#: hold ``"lr": null`` and the method's own settings in ``attack_settings``; the report shows "—" for those columns.
NO_OPTIMIZER_METHODS = ("refusal_ablation",)
#: methods whose learning rate is in units of the perturbation's radius (the trained tensor is δ / radius)
RADIUS_LR_METHODS = ("embedding", "latent")
#: the adversary fields a method of :data:`NO_OPTIMIZER_METHODS` does not use (listed in its ``attack_settings``)
OPTIMIZER_FIELDS = ("optimizer", "optimizer_kwargs", "lr", "weight_decay", "schedule", "warmup_steps",
                    "schedule_kwargs")


@dataclass
class RedTeamResult:
    """What :func:`~tar_lightning.evaluation.redteam.run_redteam` returns (everything is also on disk under
    ``out_dir``).

    Attributes:
        suite: the suite as run (scaled, seeds and data overrides applied).
        runs: every run record (attack, seed, before, after, trajectory, config, attack_settings, ...), in suite
            order. ``config`` is the resolved configuration as the suite gives it (what the configuration hash
            covers); ``attack_settings`` is what the attack actually used
            (:func:`~tar_lightning.evaluation.redteam.runner.attack_settings`).
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
