"""Results over training seeds: :func:`aggregate_seeds`, a pure function of the per-seed ``results.json`` dicts.

``tar-lightning demo --seeds 0,1,2`` runs the whole demo once per training seed into ``<out>/seed<N>/``
(:func:`~tar_lightning.demo.run.run_seeds`) and then aggregates the per-seed ``results.json`` files with
:func:`aggregate_seeds` into ``<out>/results.json`` (:func:`~tar_lightning.demo.report.write_seed_results`).

Every number of a training seed is already the mean over its attack seeds (``redteam.seeds``); for each number
the aggregate gives, over the training seeds (:func:`spread`):

- ``mean``: the mean over training seeds, ``std``: their sample standard deviation (ddof = 1; ``None`` for one
  training seed), ``min`` / ``max``, ``per_seed``: the values in the order of ``training_seeds``;
- for the post-attack safety metric of a cell also ``pooled_std``: the sample standard deviation (ddof = 1) over
  every (training seed × attack seed) run, recovered exactly from each seed's mean, sample std and run count
  (:func:`pooled_std`; ``results.json`` keeps no other per-run spread).

Targets (:func:`~tar_lightning.demo.report.demo_targets`) are judged again on the mean of the per-seed values
(and of the per-seed thresholds where the threshold is itself measured, as in ``extended_vs_paper``), with the
per-seed values and verdicts next to them. A target marked ``every_seed`` (``stage0``: each seed's world instance
is valid) is met only when it is met on every training seed: a mean would hide the one seed that fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.aggregate import mean, std

__all__ = [
    "BEFORE_METRICS",
    "CELL_METRICS",
    "IGNORED_CONFIG_KEYS",
    "SUMMARY_METRICS",
    "aggregate_seeds",
    "judge",
    "pooled_std",
    "spread",
]

#: Summary keys of a defense before any attack (``summary[defense]`` of a per-seed ``results.json``).
BEFORE_METRICS: tuple[str, ...] = ("before", "before_A", "before_retain", "before_forget_loss", "before_retain_loss")
#: Cell keys aggregated for every defense × attack (each a mean over the seed's attack seeds).
CELL_METRICS: tuple[str, ...] = ("safety_before", "safety_after", "capability_before", "capability_after", "auc",
                                 "forget_A_after", "forget_loss_after")
#: Per-defense summary numbers after the attacks (``worst`` / ``bounded_worst`` are their ``safety_after``).
SUMMARY_METRICS: tuple[str, ...] = ("mean", "worst", "bounded_worst", "retain_after_mean")
#: Configuration keys that may differ between the per-seed runs being aggregated (they do not change numbers,
#: or are what differs by design).
IGNORED_CONFIG_KEYS: tuple[str, ...] = ("seed", "seeds", "out", "workers", "threads", "progress")


def spread(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """The spread of one number over training seeds.

    Args:
        values: one value per training seed (``None``: not measured for that seed; left out of the statistics).

    Returns:
        ``{"mean", "std", "min", "max", "n", "per_seed"}``: ``std`` is the sample standard deviation (ddof = 1),
        ``None`` with fewer than two values; ``n`` counts the values that are not ``None``; ``per_seed`` is
        ``values`` as given.
    """
    vals = [float(v) for v in values if v is not None]
    return {
        "mean": mean(vals),
        "std": std(vals) if len(vals) > 1 else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "n": len(vals),
        "per_seed": [None if v is None else float(v) for v in values],
    }


def pooled_std(means: Sequence[float], stds: Sequence[float], counts: Sequence[int]) -> Optional[float]:
    """The sample standard deviation (ddof = 1) of all runs of several groups, from each group's mean, sample
    standard deviation (ddof = 1; 0 for one run) and run count.

    The total sum of squares is ``Σ (n_i − 1) s_i² + n_i (m_i − m)²`` with ``m = Σ n_i m_i / N``; the result is
    ``sqrt(SS / (N − 1))``, the same number as the standard deviation of the runs themselves.

    Returns:
        ``None`` with fewer than two runs in all.

    Raises:
        ConfigError: the three sequences differ in length or a count is below 1.
    """
    if not len(means) == len(stds) == len(counts):
        raise ConfigError(f"pooled_std: {len(means)} means, {len(stds)} stds and {len(counts)} counts; expected as many")
    if any(int(n) < 1 for n in counts):
        raise ConfigError(f"pooled_std: run counts must be >= 1, got {list(counts)}")
    total = sum(int(n) for n in counts)
    if total < 2:
        return None
    grand = sum(n * m for m, n in zip(means, counts, strict=True)) / total
    ss = sum((n - 1) * s * s + n * (m - grand) ** 2 for m, s, n in zip(means, stds, counts, strict=True))
    return math.sqrt(ss / (total - 1))


def judge(value: Optional[float], op: str, threshold: Optional[float]) -> Optional[bool]:
    """Whether ``value op threshold`` holds (``op`` one of ``<=``, ``>=``, ``<``, ``>``); ``None`` when either
    side is missing.

    Raises:
        ConfigError: an unknown ``op``.
    """
    if op not in ("<=", ">=", "<", ">"):
        raise ConfigError(f"target op must be one of '<=', '>=', '<', '>', got {op!r}")
    if value is None or threshold is None:
        return None
    return bool({"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold,
                 ">": value > threshold}[op])


def _check_same_runs(results: Sequence[Mapping[str, Any]], seeds: list[int]) -> None:
    first = results[0]
    for seed, res in zip(seeds[1:], results[1:], strict=True):
        for key in ("defenses", "attacks"):  # as sets: demo versions before 0.2 listed defenses in the order
            # their worker processes finished, which may differ between seeds of one configuration
            if sorted(res.get(key) or []) != sorted(first.get(key) or []):
                raise ConfigError(f"training seed {seed}: its {key} {res.get(key)} differ from seed {seeds[0]}'s "
                                  f"{first.get(key)}; aggregate runs of one configuration")
        a, b = res.get("config") or {}, first.get("config") or {}
        for key in sorted(set(a) | set(b)):
            if key not in IGNORED_CONFIG_KEYS and a.get(key) != b.get(key):
                raise ConfigError(f"training seed {seed}: config key {key!r} is {a.get(key)!r}, seed {seeds[0]}'s is "
                                  f"{b.get(key)!r}; aggregate runs of one configuration")


def _targets(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Targets re-judged on the mean over training seeds (same nesting as a per-seed ``targets``)."""

    def one(checks: list[Optional[Mapping]]) -> dict[str, Any]:
        known = [c for c in checks if c is not None]
        op, what = known[0]["op"], known[0].get("what", "")
        values = spread([None if c is None else c.get("value") for c in checks])
        thresholds = [c.get("threshold") for c in known]
        fixed = all(t == thresholds[0] for t in thresholds)
        threshold = thresholds[0] if fixed else mean([float(t) for t in thresholds if t is not None])
        per_seed_met = [None if c is None else c.get("met") for c in checks]
        every_seed = any(c.get("every_seed") for c in known)
        if every_seed:  # one failing seed fails it; unknown while any seed is unknown and none failed
            met = False if False in per_seed_met else (None if None in per_seed_met else True)
        else:
            met = judge(values["mean"], op, threshold)
        return {
            "value": values["mean"], "op": op, "threshold": threshold, "met": met,
            "what": what + ("" if fixed else " (threshold: mean of the per-seed thresholds)")
            + (" (met only when met on every seed)" if every_seed else ""),
            "every_seed": every_seed,
            "std": values["std"], "min": values["min"], "max": values["max"], "n": values["n"],
            "per_seed": values["per_seed"],
            "per_seed_threshold": [None if c is None else c.get("threshold") for c in checks],
            "per_seed_met": per_seed_met,
        }

    names: list[str] = []
    for res in results:
        names += [n for n in (res.get("targets") or {}) if n not in names]
    out: dict[str, Any] = {}
    for name in names:
        entries = [(res.get("targets") or {}).get(name) for res in results]
        if any(e is not None and "met" in e for e in entries):
            out[name] = one(entries)
            continue
        subs: list[str] = []
        for e in entries:
            subs += [k for k in (e or {}) if k not in subs]
        out[name] = {k: one([None if e is None else e.get(k) for e in entries]) for k in subs}
    return out


def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregates the demo's per-training-seed results (pure: plain dicts in, a JSON-ready dict out).

    Args:
        results: the ``results.json`` dicts of the runs, one per training seed (its ``config.seed``), all of one
            configuration otherwise (keys in :data:`IGNORED_CONFIG_KEYS` may differ).

    Returns:
        ``training_seeds``; ``attack_seeds`` (``redteam.seeds``); ``safety_metric``, ``capability_metric``,
        ``chance``, ``defenses``, ``attacks`` (as in every per-seed file); ``before``: defense -> metric of
        :data:`BEFORE_METRICS` -> :func:`spread`; ``cells``: defense -> attack -> metric of :data:`CELL_METRICS`
        -> :func:`spread` (``safety_after`` with ``pooled_std`` over every run) plus ``broke`` (per seed);
        ``summary``: defense -> metric of :data:`SUMMARY_METRICS` -> :func:`spread` (``worst`` and
        ``bounded_worst`` with ``attack``: the attack per seed); ``targets``: every per-seed target judged on the
        mean (see the module docstring); ``seed_wall_time_s``: each seed's wall time.

    Raises:
        ConfigError: no results, a result without ``config.seed``, a training seed given twice, or runs whose
            defenses, attacks or configuration (beyond :data:`IGNORED_CONFIG_KEYS`) differ.
    """
    if not results:
        raise ConfigError("aggregate_seeds: no per-seed results to aggregate")
    seeds = []
    for i, res in enumerate(results):
        seed = (res.get("config") or {}).get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"aggregate_seeds: results[{i}] has no integer config.seed (got {seed!r})")
        if seed in seeds:
            raise ConfigError(f"aggregate_seeds: training seed {seed} is given twice")
        seeds.append(seed)
    _check_same_runs(results, seeds)
    first = results[0]
    defenses, attacks = list(first["defenses"]), list(first["attacks"])
    before: dict[str, Any] = {}
    cells: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for d in defenses:
        sums = [res["summary"][d] for res in results]
        before[d] = {m: spread([s.get(m) for s in sums]) for m in BEFORE_METRICS}
        cells[d] = {}
        for a in attacks:
            cs = [res["cells"][d][a] for res in results]
            cell = {m: spread([c.get(m) for c in cs]) for m in CELL_METRICS}
            if all(c.get("safety_after") is not None and c.get("safety_after_std") is not None for c in cs):
                cell["safety_after"]["pooled_std"] = pooled_std(
                    [c["safety_after"] for c in cs], [c["safety_after_std"] for c in cs],
                    [int(c.get("seeds") or 1) for c in cs])
            else:
                cell["safety_after"]["pooled_std"] = None
            cell["broke"] = [c.get("broke") for c in cs]
            cell["suite"] = cs[0].get("suite")
            cells[d][a] = cell
        summary[d] = {
            "mean": spread([s.get("mean") for s in sums]),
            "worst": {**spread([(s.get("worst") or {}).get("safety_after") for s in sums]),
                      "attack": [(s.get("worst") or {}).get("attack") for s in sums]},
            "bounded_worst": {**spread([(s.get("bounded_worst") or {}).get("safety_after") for s in sums]),
                              "attack": [(s.get("bounded_worst") or {}).get("attack") for s in sums]},
            "retain_after_mean": spread([s.get("retain_after_mean") for s in sums]),
        }
    return {
        "training_seeds": seeds,
        "attack_seeds": ((first.get("config") or {}).get("redteam") or {}).get("seeds"),
        "safety_metric": first.get("safety_metric"),
        "capability_metric": first.get("capability_metric"),
        "chance": first.get("chance"),
        "defenses": defenses,
        "attacks": attacks,
        "before": before,
        "cells": cells,
        "summary": summary,
        "targets": _targets(results),
        "seed_wall_time_s": [res.get("wall_time_s") for res in results],
    }
