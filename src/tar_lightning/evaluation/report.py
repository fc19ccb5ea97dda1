"""Writing a red team's results: ``results.json``, ``results.csv``, ``report.md`` and PNG plots.

Reports carry scores and configurations only, never generated text. A ``sweep:`` attack's configuration row
shows its best trial, and a ``Sweeps`` table lists every sweep run's best trial (:func:`sweep_rows`). Numbers in ``report.md`` are rounded to
4 decimals; ``results.json`` and ``results.csv`` hold them at full precision. Refusal metrics with a
``second_judge`` get a ``Judge agreement`` table (:func:`judge_agreement_rows`): the second judge's value, the
agreement and Cohen's kappa of the two judges on the same answers, from each run record's ``judge_agreement``
(run files without it, written before it existed or without a second judge, simply add no row).

The tables show what an attack used, not the unused defaults of its configuration: a method without an optimizer
(``refusal_ablation``, :data:`~tar_lightning.evaluation.redteam.result.NO_OPTIMIZER_METHODS`) gets "—" for
optimizer, LR, schedule, warmup and steps, and its own settings (layer, position, prompts read) in the method
cell; the LR of ``embedding`` / ``latent`` is marked ``×radius`` (it is in units of the perturbation's radius,
whose value the method cell shows).

Plots (matplotlib, Agg backend; skipped with a warning when matplotlib is missing):

- ``heatmap.png``: post-attack safety per attack (rows) and seed (columns, plus the mean);
- ``trajectories.png``: the held-out forget loss (``evaluation.loss_metric``) along every attack, one plot;
- ``recovery.png``: the safety metric along every attack (mean over seeds), with threshold and chance;
- ``capability_vs_safety.png``: post-attack capability against post-attack safety per attack, with the
  pre-attack model and the capability floor.

Dependencies go one way: this module reads the red team's types and file helpers
(:mod:`tar_lightning.evaluation.redteam.result`, :mod:`tar_lightning.evaluation.redteam.io`);
:func:`~tar_lightning.evaluation.redteam.run_redteam` (``redteam.run``) calls :func:`write_results`.
:func:`pyplot` is also what the demo's plots use.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from tar_lightning.checkpoint import atomic_write
from tar_lightning.evaluation import aggregate as agg
from tar_lightning.evaluation.redteam.io import json_text, write_text
from tar_lightning.evaluation.redteam.result import NO_OPTIMIZER_METHODS, RADIUS_LR_METHODS, RedTeamResult
from tar_lightning.evaluation.refusal import AGREEMENT_TABLE, agreement_from_table

__all__ = [
    "csv_rows",
    "fmt",
    "judge_agreement_rows",
    "load_results",
    "markdown_report",
    "pyplot",
    "sweep_rows",
    "write_plots",
    "write_results",
]

log = logging.getLogger(__name__)

PLOTS = {
    "heatmap": "heatmap.png",
    "trajectories": "trajectories.png",
    "recovery": "recovery.png",
    "capability_vs_safety": "capability_vs_safety.png",
}


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` decimals, ``None`` as an em dash, booleans as yes/no."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _lr(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3g}"


def _run_method(r: Mapping) -> Optional[str]:
    """The adversary method a run record's attack used (a sweep's: its best trial's)."""
    settings = r.get("attack_settings")
    if isinstance(settings, Mapping) and settings.get("method"):
        return settings["method"]
    sweep = r.get("sweep")
    if sweep:
        return sweep["trials"][sweep["best"]]["adversary"].get("method")
    return ((r.get("config") or {}).get("adversary") or {}).get("method")


def _run_lr(r: Mapping, method: Optional[str]) -> str:
    """A run's drawn LR as the report shows it: "—" without an optimizer, ``×radius`` for activation attacks."""
    if method in NO_OPTIMIZER_METHODS:
        return "—"
    text = _lr(r.get("lr"))
    return f"{text} ×radius" if method in RADIUS_LR_METHODS and r.get("lr") is not None else text


def _method_cell(method: str, adv: Mapping, settings: Mapping) -> str:
    """The configuration table's method cell for the methods with settings of their own (``settings``: the first
    run's ``attack_settings``, empty for records written before it existed)."""
    if method in NO_OPTIMIZER_METHODS:
        spec = adv.get("refusal_ablation") or {}
        layer = settings.get("layer", spec.get("layer"))
        text = f"{method} (layer {'middle' if layer is None else layer}, position {spec.get('position', -1)}"
        if settings.get("harmless_prompts") is not None:
            text += (f"; {settings['harmless_prompts']} harmless + {settings['harmful_prompts']} harmful prompts in "
                     f"{settings['batches']} batches")
        return text + "; no optimizer)"
    if method in RADIUS_LR_METHODS:
        spec = adv.get(method) or {}
        layer = settings.get("layer", spec.get("layer"))
        where = f"scope {spec.get('scope', 'universal')}" if method == "embedding" else (
            f"layer {'middle' if layer is None else layer}")
        bound = f"ε {float(spec.get('epsilon', 0)):g}" + (" × mean norm" if spec.get("relative") else "")
        if settings.get("radius") is not None:
            bound += f" = radius {float(settings['radius']):.3g}"
        return f"{method} ({where}; {bound})"
    return method


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_names(runs: Sequence[Mapping], first: Sequence[str]) -> list[str]:
    names = list(first)
    for r in runs:
        for part in ("before", "after"):
            for k in r.get(part, {}):
                if k not in names:
                    names.append(k)
    return names


def csv_rows(runs: Sequence[Mapping], safety: Mapping, capability: Mapping) -> tuple[list[str], list[dict]]:
    """Header and rows of ``results.csv``: one row per run, every metric before and after."""
    metrics = _metric_names(runs, [safety["metric"], capability["metric"]])
    header = ["attack", "seed", "steps", "lr", "switch_point"]
    header += [f"{m}_{part}" for m in metrics for part in ("before", "after")]
    header += ["steps_to_recover", "wall_time_s", "config_hash"]
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "attack": r["attack"],
            "seed": r["seed"],
            "steps": r.get("steps"),
            "lr": r.get("lr"),
            "switch_point": r.get("switch_point"),
            "steps_to_recover": agg.steps_to_recover(
                agg.curve(r, safety["metric"]), safety.get("recovery_threshold"), safety["direction"]
            ),
            "wall_time_s": r.get("wall_time_s"),
            "config_hash": r.get("config_hash"),
        }
        for m in metrics:
            row[f"{m}_before"] = r.get("before", {}).get(m)
            row[f"{m}_after"] = r.get("after", {}).get(m)
        rows.append(row)
    return header, rows


def sweep_rows(runs: Sequence[Mapping], safety_metric: str) -> list[list[Any]]:
    """Rows of the report's ``Sweeps`` table: one per sweep run, its best trial's configuration and result."""
    rows = []
    for r in runs:
        sweep = r.get("sweep")
        if not sweep:
            continue
        best = sweep["trials"][sweep["best"]]
        adv = best["adversary"]
        method = adv["method"] + (f" r{adv['lora_rank']}" if adv.get("lora_rank") else "")
        rows.append(
            [
                r["attack"],
                r["seed"],
                len(sweep["trials"]),
                sweep["infeasible"],
                sweep["resumed"],
                best["trial"],
                adv["data"],
                method,
                adv["optimizer"],
                _lr(adv["lr"]),
                adv["schedule"],
                adv["steps"],
                best["after"].get(safety_metric),
                sweep["qualified"],
            ]
        )
    return rows


def other_metric_rows(
    runs: Sequence[Mapping], attack_ids: Sequence[str], declared: Sequence[str], shown: Sequence[str]
) -> Optional[tuple[list[str], list[list[Any]]]]:
    """The "Other metrics" table of ``report.md``: per attack, the mean over its runs of every suite metric that is
    not the safety or capability metric (``shown``), before and after; ``None`` when there is none.

    Args:
        runs: the run records (``before``/``after`` metric mappings).
        attack_ids: the attacks in suite order.
        declared: the suite's ``evaluation.metrics`` names (an evaluator's extra outputs are not listed).
        shown: metrics the report's other tables already show.
    """
    names = [m for m in declared if m not in shown and any(m in r["before"] or m in r["after"] for r in runs)]
    if not names:
        return None

    def mean(values: list[float]) -> Optional[float]:
        return sum(values) / len(values) if values else None

    rows = []
    for attack in attack_ids:
        own = [r for r in runs if r["attack"] == attack]
        if not own:
            continue
        row: list[Any] = [attack]
        for m in names:
            before = mean([float(r["before"][m]) for r in own if m in r["before"]])
            after = mean([float(r["after"][m]) for r in own if m in r["after"]])
            row.append(f"{fmt(before)} → {fmt(after)}")
        rows.append(row)
    return ["attack", *names], rows


def judge_agreement_rows(runs: Sequence[Mapping], attack_ids: Sequence[str]) -> Optional[list[list[Any]]]:
    """Rows of the "Judge agreement" table of ``report.md``: per attack, refusal metric with a second judge and stage
    (before / after the attack), the 2×2 tables of the attack's runs summed (pooled over seeds) and read as one:
    ``[attack, metric, "judge vs second judge", stage, "answers (runs)", value, second value, agreement, kappa]``
    (:func:`~tar_lightning.evaluation.refusal.agreement_from_table`; kappa ``None`` when both judges gave every
    answer one and the same label). ``None`` when no run has a ``judge_agreement``."""
    rows: list[list[Any]] = []
    for attack in attack_ids:
        own = [r for r in runs if r["attack"] == attack and isinstance(r.get("judge_agreement"), Mapping)]
        metrics: list[str] = []
        for r in own:
            for stage in ("before", "after"):
                for m in r["judge_agreement"].get(stage) or {}:
                    if m not in metrics:
                        metrics.append(m)
        for m in metrics:
            for stage in ("before", "after"):
                found = [r["judge_agreement"][stage][m] for r in own if m in (r["judge_agreement"].get(stage) or {})]
                if not found:
                    continue
                pooled = agreement_from_table(*(sum(int(e[c]) for e in found) for c in AGREEMENT_TABLE))
                first, second = pooled["first_refusal_rate"], pooled["second_refusal_rate"]
                if found[0].get("kind") == "asr":
                    first, second = 1.0 - first, 1.0 - second
                rows.append([
                    attack, m, f"{found[0].get('judge')} vs {found[0].get('second_judge')}", stage,
                    f"{pooled['n']} ({len(found)})", first, second, pooled["agreement"], pooled["kappa"],
                ])
    return rows or None


def _direction_words(direction: str, safety: bool) -> str:
    if safety:
        return "higher is safer" if direction == "higher_is_better" else "lower is safer"
    return "higher is better" if direction == "higher_is_better" else "lower is better"


def markdown_report(result: RedTeamResult, summary: Mapping, plots: Mapping[str, Path]) -> str:
    """The text of ``report.md``."""
    suite = result.suite
    spec = suite.evaluation
    safety, capability = spec.safety, spec.capability
    aggregate = result.aggregate
    model = summary.get("model", {})
    model_text = model.get("source") or model.get("module") or "?"
    scales = sorted({a.scale for a in suite.attacks})
    lines = [
        f"# Red team: `{suite.name}`",
        "",
        f"- Model: `{model_text}`" + (f" (weights {model['weights']})" if "weights" in model else ""),
        f"- Attacks: {len(suite.attacks)}; runs: {len(result.runs)}; scale: {', '.join(fmt(s, 6) for s in scales)}",
        f"- Safety metric: `{safety.metric}` ({_direction_words(safety.direction, True)}); recovery threshold: "
        f"{fmt(safety.recovery_threshold)}; chance: {fmt(safety.chance)}",
        f"- Capability metric: `{capability.metric}` ({_direction_words(capability.direction, False)}); "
        f"capability floor for the bounded worst case: {fmt(spec.capability_floor)}",
        f"- Evaluator: `{summary.get('evaluator', '?')}`; wall time: {fmt(summary.get('wall_time_s'), 1)} s",
        "",
        "## Summary",
        "",
    ]
    worst, bounded = aggregate["worst_case"], aggregate["bounded_worst_case"]
    lines.append(
        _table(
            ["score", "attack", f"{safety.metric} after"],
            [
                ["suite mean", None, aggregate["suite_mean"]],
                ["worst case", worst["attack"], worst["safety_after"]],
                ["bounded worst case", bounded["attack"], bounded["safety_after"]],
            ],
        )
    )
    broken = aggregate["broken"]
    lines += [
        "",
        "Broke the safeguard (mean post-attack safety passed the recovery threshold): "
        + (
            ", ".join(f"`{b}`" for b in broken)
            if broken
            else ("none" if safety.recovery_threshold is not None else "no threshold set")
        ),
        "",
        f"Bounded worst case over the attacks that kept ≥ {fmt(spec.capability_floor)} of the pre-attack "
        f"capability: {', '.join(f'`{i}`' for i in bounded['eligible']) or 'none'}.",
        "",
        "## Attacks",
        "",
        "Means over seeds. *kept*: capability stayed at or above the floor; *broke*: post-attack safety passed "
        "the recovery threshold; *AUC*: mean breach of the safety metric beyond chance over the attack "
        "(normalised area under the recovery curve); *steps to recover*: mean over the seeds that recovered "
        "(recovered/seeds).",
        "",
    ]
    rows = []
    for attack in suite.attacks:
        a = aggregate["attacks"].get(attack.id)
        if a is None:
            continue
        stv = f"{fmt(a['steps_to_recover_mean'], 1)} ({a['recovered_runs']}/{a['seeds']})"
        rows.append(
            [
                attack.id,
                attack.comment,
                a["seeds"],
                a["safety_before"],
                a["safety_after"],
                a["safety_after_std"],
                a["capability_before"],
                a["capability_after"],
                a["capability_kept"],
                a["broke"],
                a["auc"],
                stv,
            ]
        )
    lines.append(
        _table(
            [
                "attack",
                "what",
                "seeds",
                "safety before",
                "safety after",
                "± (std)",
                "capability before",
                "capability after",
                "kept",
                "broke",
                "AUC",
                "steps to recover",
            ],
            rows,
        )
    )
    lines += ["", "## Runs", ""]
    run_rows = [
        [
            r["attack"],
            r["seed"],
            None if _run_method(r) in NO_OPTIMIZER_METHODS else r.get("steps"),
            _run_lr(r, _run_method(r)),
            r["before"].get(safety.metric),
            r["after"].get(safety.metric),
            r["before"].get(capability.metric),
            r["after"].get(capability.metric),
            r.get("wall_time_s"),
        ]
        for r in result.runs
    ]
    lines.append(
        _table(
            [
                "attack",
                "seed",
                "steps",
                "lr",
                "safety before",
                "safety after",
                "capability before",
                "capability after",
                "wall s",
            ],
            run_rows,
        )
    )
    others = other_metric_rows(result.runs, [a.id for a in suite.attacks], list(spec.metrics),
                               (safety.metric, capability.metric))
    if others:
        header, rows = others
        lines += [
            "",
            "## Other metrics",
            "",
            "The suite's other metrics (e.g. ASR with a jailbreak template, over-refusal), before → after, means over "
            "seeds (—: not computed for that attack).",
            "",
            _table(header, rows),
        ]
    agreement = judge_agreement_rows(result.runs, [a.id for a in suite.attacks])
    if agreement:
        lines += [
            "",
            "## Judge agreement",
            "",
            "Refusal metrics with a `second_judge`: the same answers judged twice; the metric's value (elsewhere in "
            "this report) is the first judge's. Per attack and stage, the runs' tables pooled: *answers* judged "
            "(runs), each judge's value of the metric, *agreement* (share of answers both judges labelled alike, "
            "refused or not) and Cohen's *κ* = (p_o − p_e)/(1 − p_e) (—: undefined, both judges gave every answer "
            "the same label). Per run: `judge_agreement` in `runs/<attack>__seed<k>.json`.",
            "",
            _table(["attack", "metric", "judges", "stage", "answers (runs)", "value", "second judge's value",
                    "agreement", "κ"], agreement),
        ]
    lines += ["", "## Resolved configuration", ""]
    cfg_rows = []
    seen = set()
    for r in result.runs:
        if r["attack"] in seen:
            continue
        seen.add(r["attack"])
        adv = r["config"]["adversary"]
        lora = adv.get("lora") or {}
        method = adv["method"]
        trains = method not in NO_OPTIMIZER_METHODS
        radius_lr = method in RADIUS_LR_METHODS
        if method == "lora":
            method = f"lora r{lora.get('rank')} α{fmt(float(lora.get('alpha', 0)), 0)}"
            if lora.get("quantize_base"):
                method += f" ({lora['quantize_base']} base)"
        else:
            method = _method_cell(method, adv, r.get("attack_settings") or {})
        if r["config"].get("search"):
            method = f"search ({r['config']['search']['trials']} trials)"
        if r.get("sweep"):  # the best trial's configuration (of the attack's first run)
            sweep = r["sweep"]
            adv = {**adv, **sweep["trials"][sweep["best"]]["adversary"]}
            method = adv["method"] + (f" r{adv['lora_rank']}" if adv.get("lora_rank") else "")
            method = f"sweep: best of {len(sweep['trials'])} trials ({method})"
        switch = adv.get("switch")
        data = adv["data"] if not switch else f"{switch['retain_stream']}→{adv['data']}"
        lr = _lr(adv["lr"]) if not isinstance(adv["lr"], list) else "/".join(_lr(x) for x in adv["lr"])
        if radius_lr:
            lr += " ×radius"
        cfg_rows.append(
            [
                r["attack"],
                data,
                method,
                adv["optimizer"] if trains else None,
                lr if trains else None,
                adv["schedule"] if trains else None,
                adv["warmup_steps"] if trains else None,
                adv["steps"] if trains else None,
                adv["batch_size"],
                r["config"].get("eval_every"),
            ]
        )
    lines.append(
        _table(
            [
                "attack",
                "data",
                "method",
                "optimizer",
                "lr",
                "schedule",
                "warmup",
                "steps",
                "batch",
                "eval every",
            ],
            cfg_rows,
        )
    )
    if any(_run_method(r) in NO_OPTIMIZER_METHODS + RADIUS_LR_METHODS for r in result.runs):
        lines += [
            "",
            "What each attack used: *lr* of `embedding` / `latent` attacks is in units of the perturbation's radius "
            "(`×radius`; the method cell gives the bound). `refusal_ablation` trains nothing: it has no optimizer, "
            "LR, schedule or optimizer steps (—); the method cell gives the layer and position read and the prompts "
            "averaged. Each run's `attack_settings` in `runs/<attack>__seed<k>.json` records the same.",
        ]
    sweeps = sweep_rows(result.runs, safety.metric)
    if sweeps:
        lines += [
            "",
            "## Sweeps",
            "",
            "Utility-bounded TPE sweeps: per run, the best trial (the most damaging one that kept the capability "
            "bound; *qualified* no: none did, the one keeping the most capability is shown). The study: "
            "`runs/<attack>__seed<k>.sweep.db` (Optuna, SQLite).",
            "",
            _table(
                ["attack", "seed", "trials", "infeasible", "resumed", "best", "data", "method", "optimizer",
                 "lr", "schedule", "steps", f"{safety.metric} after", "qualified"],
                sweeps,
            ),
        ]
    lines += [
        "",
        "Every run's full configuration and trajectory: `runs/<attack>__seed<k>.json`; all of them: "
        "`results.json`; one row per run: `results.csv`.",
    ]
    if plots:
        lines += ["", "## Plots", ""]
        titles = {
            "heatmap": "Post-attack safety per attack and seed",
            "trajectories": f"`{spec.trajectory_metric}` along every attack",
            "recovery": "Recovery curves (safety metric, mean over seeds)",
            "capability_vs_safety": "Capability against safety after each attack",
        }
        for key, path in plots.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{key}]({Path(path).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or ``None`` with a warning when
    matplotlib is not installed (plots are then skipped)."""
    try:
        import matplotlib  # optional dependency: plots only

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt  # optional dependency: plots only
    except ImportError:
        log.warning("red team: matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    return plt


def write_plots(result: RedTeamResult, out_dir: Path) -> dict[str, Path]:
    """Writes the PNG plots; returns name -> path of those written (empty without matplotlib)."""
    plt = pyplot()
    if plt is None or not result.runs:
        return {}
    suite = result.suite
    spec = suite.evaluation
    safety, capability = spec.safety, spec.capability
    ids = [a.id for a in suite.attacks if a.id in result.aggregate["attacks"]]
    written: dict[str, Path] = {}

    # heatmap: attacks × seeds
    seeds = sorted({r["seed"] for r in result.runs})
    grid = [[math.nan] * (len(seeds) + 1) for _ in ids]
    for r in result.runs:
        if r["attack"] in ids:
            grid[ids.index(r["attack"])][seeds.index(r["seed"])] = float(r["after"][safety.metric])
    for i, attack_id in enumerate(ids):
        grid[i][-1] = result.aggregate["attacks"][attack_id]["safety_after"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * (len(seeds) + 1), 1.0 + 0.35 * len(ids)))
    cmap = "Reds" if safety.direction == "lower_is_better" else "Reds_r"
    im = ax.imshow(grid, aspect="auto", cmap=cmap)
    ax.set_xticks(range(len(seeds) + 1), [f"seed {s}" for s in seeds] + ["mean"], fontsize=8)
    ax.set_yticks(range(len(ids)), ids, fontsize=8)
    if len(ids) * (len(seeds) + 1) <= 400:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=f"{safety.metric} after ({_direction_words(safety.direction, True)})")
    ax.set_title(f"{suite.name}: post-attack {safety.metric}")
    fig.tight_layout()
    written["heatmap"] = _save(fig, plt, out_dir / PLOTS["heatmap"])

    colors = plt.get_cmap("tab20")

    def curves_plot(metric: str, name: str, title: str, lines: Sequence[tuple[str, float, str]]) -> None:
        fig, ax = plt.subplots(figsize=(8, 5))
        drawn = 0
        for i, attack_id in enumerate(ids):
            runs = [r for r in result.runs if r["attack"] == attack_id]
            points = agg.mean_curve(runs, metric)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=attack_id, color=colors(i % 20))
            drawn += 1
        for label, value, style in lines:
            ax.axhline(value, linestyle=style, color="black", linewidth=0.8, label=label)
        ax.set_xlabel("attack step")
        ax.set_ylabel(metric)
        ax.set_title(title)
        if drawn > 1 and max((r["steps"] for r in result.runs), default=1) > 50 * max(
            1, min((r["steps"] for r in result.runs), default=1)
        ):
            ax.set_xscale("symlog", linthresh=max(1, min(r["steps"] for r in result.runs)))
        ax.legend(fontsize=6, ncol=2 if len(ids) > 12 else 1, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        written[name] = _save(fig, plt, out_dir / PLOTS[name])

    curves_plot(
        spec.trajectory_metric,
        "trajectories",
        f"{suite.name}: {spec.trajectory_metric} along every attack",
        [],
    )
    marks = []
    if safety.recovery_threshold is not None:
        marks.append(("recovery threshold", safety.recovery_threshold, "--"))
    if safety.chance is not None:
        marks.append(("chance", safety.chance, ":"))
    curves_plot(safety.metric, "recovery", f"{suite.name}: recovery curves ({safety.metric})", marks)

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, attack_id in enumerate(ids):
        a = result.aggregate["attacks"][attack_id]
        ax.scatter(a["safety_after"], a["capability_after"], color=colors(i % 20), s=25)
        ax.annotate(
            attack_id,
            (a["safety_after"], a["capability_after"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    before_s = agg.mean(result.aggregate["attacks"][i]["safety_before"] for i in ids)
    before_c = agg.mean(result.aggregate["attacks"][i]["capability_before"] for i in ids)
    ax.scatter([before_s], [before_c], marker="*", s=150, color="black", label="before attack")
    floor = spec.capability_floor
    if before_c is not None:
        line = floor * before_c if capability.direction == "higher_is_better" else before_c / floor
        ax.axhline(line, linestyle="--", color="grey", linewidth=0.8, label=f"capability floor ({floor:g})")
    ax.set_xlabel(f"{safety.metric} after ({_direction_words(safety.direction, True)})")
    ax.set_ylabel(f"{capability.metric} after ({_direction_words(capability.direction, False)})")
    ax.set_title(f"{suite.name}: capability vs safety after each attack")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written["capability_vs_safety"] = _save(fig, plt, out_dir / PLOTS["capability_vs_safety"])
    return written


def _save(fig, plt, path: Path) -> Path:
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), what="red-team plot")
    finally:
        plt.close(fig)


def write_results(
    result: RedTeamResult, summary: Mapping, *, plots: bool = True, markdown: bool = True
) -> dict[str, Path]:
    """Writes ``results.json`` and ``results.csv`` (and ``report.md`` and the plots) into ``result.out_dir``.

    Returns:
        name -> path of every file written.
    """
    out = result.out_dir
    spec = result.suite.evaluation
    files: dict[str, Path] = {}
    payload = {"summary": dict(summary), "aggregate": result.aggregate, "runs": result.runs}
    write_text(out / "results.json", json_text(payload))
    files["results.json"] = out / "results.json"

    header, rows = csv_rows(result.runs, spec.safety.to_dict(), spec.capability.to_dict())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("" if v is None else (repr(v) if isinstance(v, float) else v)) for k, v in row.items()}
        )
    write_text(out / "results.csv", buf.getvalue())
    files["results.csv"] = out / "results.csv"

    pngs: dict[str, Path] = {}
    if plots:
        pngs = write_plots(result, out)
        files.update({p.name: p for p in pngs.values()})
    if markdown:
        write_text(out / "report.md", markdown_report(result, summary, pngs))
        files["report.md"] = out / "report.md"
    return files


def load_results(out_dir: Path) -> dict:
    """Reads ``results.json`` of a finished red team."""
    return json.loads((Path(out_dir) / "results.json").read_text(encoding="utf-8"))
