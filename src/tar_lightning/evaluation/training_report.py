"""The training report of a TAR run: the fight between the adversary and the safeguard, as the paper's Figure 3.

:func:`training_report` reads what ``TARModule`` logged (Lightning's ``CSVLogger`` ``metrics.csv``, or TensorBoard
event files when ``tensorboard`` is installed) and writes into one folder:

- ``adv_loss_heatmap.png``: the adversary's loss at each inner step ``k`` (rows) across outer steps (columns),
  from the ``train/adv_loss/kNNN`` metrics (logged on the Trainer's logging steps, ``log_every_n_steps``);
- ``adv_loss_curves.png``: the same for a few ``k`` (first, quartiles, last) as curves over outer steps;
- ``tr_points.png``: the TR loss (``train/tr_loss/kNNN``) and its diagnostic (``train/entropy/kNNN`` for the
  max-entropy loss, ``tr_ce`` or ``dpo_reward_accuracy`` for the others) at each evaluation point;
- ``retain_loss.png``: ``train/retain_loss`` (and its CE and representation parts when logged);
- ``persistent_pool.png``: ``train/pool_size`` and ``train/pool_continued``, when the run used the persistent pool;
- ``report.md``: first/last value of every series, and the adversary's loss at the first and last inner step
  over the first and last 10% of outer steps (how far the adversary gets along its trajectory, early vs late).

A run folder may hold several logs (a resumed run writes a new ``version_N``): they are read oldest first (by
modification time) and a later log replaces the earlier ones from its first step on.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from tar_lightning.checkpoint import atomic_write, atomic_write_text
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.evaluation.report import pyplot

log = logging.getLogger(__name__)

__all__ = [
    "PLOTS", "REPORT_MD", "TrainingLog", "TrainingReport", "find_logs", "read_training_log", "training_markdown",
    "training_report",
]

#: plot name -> file name in the report folder
PLOTS = {
    "adv_heatmap": "adv_loss_heatmap.png",
    "adv_curves": "adv_loss_curves.png",
    "tr_points": "tr_points.png",
    "retain": "retain_loss.png",
    "pool": "persistent_pool.png",
}
REPORT_MD = "report.md"

#: ``train/<name>/kNNN``: a per-inner-step metric of ``TARModule``
PER_STEP = re.compile(r"^train/(?P<name>[A-Za-z_]+)/k(?P<k>\d+)$")
ADV = "adv_loss"
TR = "tr_loss"
#: the TR loss's diagnostic, by ``TARConfig.tr_loss`` (max_entropy, dpo, the rest)
DIAGNOSTICS = ("entropy", "dpo_reward_accuracy", "tr_ce")
ADV_FIRST, ADV_LAST = "train/adv_loss_first", "train/adv_loss_last"
RETAIN = ("train/retain_loss", "train/retain_ce", "train/retain_representation")
POOL = ("train/pool_size", "train/pool_continued")
EVENTS_GLOB = "events.out.tfevents.*"
WINDOW_SHARE = 0.1  # the first and last 10% of outer steps

Values = dict[str, dict[int, float]]  # metric -> outer step -> value


@dataclass
class TrainingLog:
    """The metrics of one run, merged over its log files.

    Attributes:
        sources: the log files read, oldest first.
        values: metric name -> logger step -> value (the last one logged at that step).
    """

    sources: list[Path]
    values: Values

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """The steps and values of metric ``name`` in step order (empty when not logged)."""
        points = sorted(self.values.get(name, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    def per_step(self, name: str) -> dict[int, str]:
        """Inner step ``k`` -> metric name of the per-inner-step metric ``train/<name>/kNNN``."""
        found = {}
        for metric in self.values:
            m = PER_STEP.match(metric)
            if m and m.group("name") == name:
                found[int(m.group("k"))] = metric
        return dict(sorted(found.items()))


@dataclass
class TrainingReport:
    """What :func:`training_report` computed and wrote.

    Attributes:
        run: the run folder (or metrics file) given.
        out_dir: the report folder.
        log: the metrics read.
        adv_k / adv_steps / adv_loss: the heatmap: inner steps ``k`` (rows), outer steps (columns) and the
            adversary's loss, shape ``[len(adv_k), len(adv_steps)]``, NaN where a step did not log it.
        tr_points / tr_steps / tr_loss: the TR loss at each evaluation point, the same layout.
        diag_name / diag: the TR loss's diagnostic (``entropy``, ``tr_ce``, ``dpo_reward_accuracy``) at each
            evaluation point (``diag_name`` is ``None`` when none was logged); rows of ``tr_points``.
        series: every series of the report (metric name -> (steps, values)), in the order of ``report.md``.
        windows: the adversary's loss at its first and last inner step over the first and last 10% of outer
            steps (``[]`` without adversary losses at both ends).
        missing: what the report would show but the log does not hold, one line each.
        files: name -> path of every file written (plots only with matplotlib).
    """

    run: Path
    out_dir: Path
    log: TrainingLog
    adv_k: list[int]
    adv_steps: list[int]
    adv_loss: np.ndarray
    tr_points: list[int]
    tr_steps: list[int]
    tr_loss: np.ndarray
    diag_name: Optional[str]
    diag: np.ndarray
    series: dict[str, tuple[list[int], list[float]]]
    windows: list[dict[str, Any]]
    missing: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- reading


def find_logs(run: Union[str, Path]) -> list[Path]:
    """The log files of ``run``, oldest first: ``run`` itself when it is a ``metrics.csv`` or an event file,
    else every ``metrics.csv`` and TensorBoard event file below it.

    Raises:
        DataError: ``run`` does not exist.
    """
    run = Path(run).expanduser()
    if not run.exists():
        raise DataError(f"training report: run {str(run)!r} does not exist; expected a run folder (its "
                        f"--trainer.default_root_dir) or a metrics.csv file")
    if run.is_file():
        return [run]
    found = [p for p in run.rglob("metrics.csv") if p.is_file()]
    found += [p for p in run.rglob(EVENTS_GLOB) if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, str(p)))


def read_training_log(run: Union[str, Path]) -> TrainingLog:
    """Reads and merges the metrics of ``run`` (see :func:`find_logs`); a later log replaces the earlier ones from
    its first step on (a resumed run's new ``version_N``).

    Raises:
        DataError: ``run`` does not exist, holds no log, a log cannot be read, or no log holds TAR metrics (the
            message names the folder and the metric names expected).
    """
    sources = find_logs(run)
    read = [_read_events(path) if path.name.startswith("events.out.tfevents") else _read_csv(path)
            for path in sources]
    values: Values = {}
    cutoff = math.inf
    for data in reversed(read):  # newest first: each older log only fills the steps before the newer ones
        steps = [s for points in data.values() for s in points]
        for name, points in data.items():
            kept = {s: v for s, v in points.items() if s < cutoff}
            if kept:
                values.setdefault(name, {}).update(kept)
        if steps:
            cutoff = min(cutoff, min(steps))
    result = TrainingLog(sources=sources, values=values)
    if not result.per_step(ADV) and ADV_FIRST not in values:
        where = f"{len(sources)} log file(s)" if sources else "no metrics.csv or TensorBoard event file"
        raise DataError(f"training report: no TAR metrics in {str(Path(run))!r} ({where}); expected "
                        f"train/adv_loss/kNNN or {ADV_FIRST} as TARModule logs them through a CSVLogger "
                        f"(metrics.csv) or a TensorBoardLogger")
    return result


def _read_csv(path: Path) -> Values:
    values: Values = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                step_text = (row.get("step") or "").strip()
                if not step_text:
                    continue
                try:
                    step = int(float(step_text))
                except ValueError:
                    raise DataError(f"training report: {str(path)!r} line {line}: step {step_text!r} is not a "
                                    f"number") from None
                for name, text in row.items():
                    if name in (None, "step", "epoch") or text is None or not text.strip():
                        continue
                    try:
                        values.setdefault(name, {})[step] = float(text)
                    except ValueError:
                        raise DataError(f"training report: {str(path)!r} line {line}: {name} = {text!r} is not a "
                                        f"number") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"training report: cannot read {str(path)!r}: {e}") from e
    return values


def _read_events(path: Path) -> Values:
    try:
        # optional dependency: only for runs logged with a TensorBoardLogger
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise DataError(f"training report: {str(path)!r} is a TensorBoard event file, which needs the tensorboard "
                        f"package (pip install 'tar_lightning[tensorboard]')") from None
    try:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        values: Values = {}
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):  # in write order: the last at a step wins
                values.setdefault(tag, {})[int(event.step)] = float(event.value)
    except Exception as e:  # a truncated or foreign file: tensorboard raises its own errors
        raise DataError(f"training report: cannot read TensorBoard event file {str(path)!r}: {e}") from e
    return values


# ---------------------------------------------------------------------------------------------------- computing


def _grid(log_: TrainingLog, by_k: Mapping[int, str]) -> tuple[list[int], list[int], np.ndarray]:
    ks = list(by_k)
    steps = sorted({s for name in by_k.values() for s in log_.values[name]})
    grid = np.full((len(ks), len(steps)), np.nan)
    column = {s: j for j, s in enumerate(steps)}
    for i, name in enumerate(by_k.values()):
        for s, v in log_.values[name].items():
            grid[i, column[s]] = v
    return ks, steps, grid


def curve_ks(ks: Sequence[int]) -> list[int]:
    """The few inner steps drawn as curves: the first, the quartiles and the last."""
    if not ks:
        return []
    n = len(ks)
    return sorted({ks[0], ks[n // 4], ks[n // 2], ks[(3 * n) // 4], ks[-1]})


def _windows(log_: TrainingLog, adv_k: list[int], adv_steps: list[int], adv_loss: np.ndarray) -> list[dict]:
    """The adversary's loss at its first and last inner step, averaged over the first and last 10% of outer steps
    (``train/adv_loss_first/last``, logged every step, else the heatmap's first and last rows)."""
    if ADV_FIRST in log_.values and ADV_LAST in log_.values:
        first, last = log_.values[ADV_FIRST], log_.values[ADV_LAST]
        steps = sorted(set(first) & set(last))
        pairs = [(first[s], last[s]) for s in steps]
        k_last = adv_k[-1] if adv_k else None
    elif len(adv_k) >= 2:
        cols = [j for j in range(len(adv_steps)) if np.isfinite(adv_loss[0, j]) and np.isfinite(adv_loss[-1, j])]
        steps = [adv_steps[j] for j in cols]
        pairs = [(float(adv_loss[0, j]), float(adv_loss[-1, j])) for j in cols]
        k_last = adv_k[-1]
    else:
        return []
    if not steps:
        return []
    n = max(1, math.ceil(WINDOW_SHARE * len(steps)))
    rows = []
    for label, part in (("first 10%", slice(0, n)), ("last 10%", slice(len(steps) - n, len(steps)))):
        chosen = pairs[part]
        at_first = float(np.mean([a for a, _ in chosen]))
        at_last = float(np.mean([b for _, b in chosen]))
        rows.append({"window": label, "steps": steps[part], "k_last": k_last, "adv_loss_first_k": at_first,
                     "adv_loss_last_k": at_last, "drop": at_first - at_last})
    return rows


def _collect(run: Path, out_dir: Path, log_: TrainingLog) -> TrainingReport:
    adv_k, adv_steps, adv_loss = _grid(log_, log_.per_step(ADV))
    tr_points, tr_steps, tr_loss = _grid(log_, log_.per_step(TR))
    diag_name = next((d for d in DIAGNOSTICS if log_.per_step(d)), None)
    diag_by_k = log_.per_step(diag_name) if diag_name else {}
    diag = np.full(tr_loss.shape, np.nan)
    column = {s: j for j, s in enumerate(tr_steps)}
    for i, k in enumerate(tr_points):
        for s, v in log_.values.get(diag_by_k.get(k, ""), {}).items():
            if s in column:
                diag[i, column[s]] = v
    names = [log_.per_step(ADV)[k] for k in curve_ks(adv_k)]
    names += [ADV_FIRST, ADV_LAST, "train/tr_loss"]
    names += list(log_.per_step(TR).values())
    if diag_name:
        names += list(diag_by_k.values()) + [f"train/{diag_name}_last"]
    names += list(RETAIN) + list(POOL)
    series = {name: log_.series(name) for name in names if log_.values.get(name)}
    missing = []
    if not adv_k:
        missing.append("the adversary's loss per inner step (train/adv_loss/kNNN): TARModule logs it on the "
                       "Trainer's logging steps only; lower trainer.log_every_n_steps")
    if not tr_points:
        missing.append("the TR loss per evaluation point (train/tr_loss/kNNN): logged on the logging steps only")
    elif diag_name is None:
        missing.append("the TR diagnostic per evaluation point (train/entropy/kNNN or similar)")
    if "train/retain_loss" not in log_.values:
        missing.append("the retain loss (train/retain_loss)")
    if not any(p in log_.values for p in POOL):
        missing.append("the persistent pool (train/pool_size, train/pool_continued): not logged (the run used "
                       "no persistent adversary pool)")
    return TrainingReport(
        run=run, out_dir=out_dir, log=log_, adv_k=adv_k, adv_steps=adv_steps, adv_loss=adv_loss,
        tr_points=tr_points, tr_steps=tr_steps, tr_loss=tr_loss, diag_name=diag_name, diag=diag, series=series,
        windows=_windows(log_, adv_k, adv_steps, adv_loss), missing=missing,
    )


# ---------------------------------------------------------------------------------------------------- writing


def _num(value: Optional[float]) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"


def training_markdown(report: TrainingReport) -> str:
    """``report.md``: the sources, one row per series (first/last value) and the early-vs-late trajectory table."""
    K = len(report.adv_k)
    steps = sorted({s for values in report.log.values.values() for s in values})
    lines = [
        "# TAR training report",
        "",
        f"Run: `{report.run}` — {len(steps)} logged outer steps"
        + (f" ({steps[0]}–{steps[-1]})" if steps else "")
        + (f", K = {K} inner steps" if K else "")
        + (f", TR evaluation points k = {', '.join(map(str, report.tr_points))}" if report.tr_points else "")
        + ".",
        "",
        "Logs read (oldest first; a later log replaces the earlier ones from its first step on):",
        "",
    ]
    lines += [f"- `{p}`" for p in report.log.sources]
    lines += ["", "## Series", "", "| series | points | first step | first value | last step | last value |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, (xs, ys) in report.series.items():
        lines.append(f"| `{name}` | {len(xs)} | {xs[0]} | {_num(ys[0])} | {xs[-1]} | {_num(ys[-1])} |")
    if report.windows:
        k_last = report.windows[0]["k_last"]
        last_label = f"k = {k_last}" if k_last is not None else "the last k"
        lines += [
            "", "## The adversary along its trajectory, early vs late in training", "",
            f"Mean adversary loss at its first inner step (k = 0) and its last ({last_label}); the drop is how far "
            "the adversary gets along its trajectory. A drop that shrinks from the first to the last outer steps "
            "means the safeguard holds the adversary back along its whole trajectory; a loss at k = 0 that rises "
            "while the drop stays means only the adversary's start is held back.",
            "", "| outer steps | steps | adv loss, k = 0 | adv loss, last k | drop |", "|---|---|---:|---:|---:|",
        ]
        for w in report.windows:
            span = f"{w['steps'][0]}–{w['steps'][-1]}" if len(w["steps"]) > 1 else str(w["steps"][0])
            lines.append(f"| {w['window']} | {span} ({len(w['steps'])}) | {_num(w['adv_loss_first_k'])} | "
                         f"{_num(w['adv_loss_last_k'])} | {_num(w['drop'])} |")
    if report.missing:
        lines += ["", "## Not in the log", ""] + [f"- {m}" for m in report.missing]
    plots = {n: p for n, p in report.files.items() if n in PLOTS}
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def _save(fig: Any, plt: Any, path: Path) -> Path:
    try:
        for ax in fig.axes:
            if ax.get_xlabel() == "outer step":  # steps are integers
                ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), what="training-report plot")
    finally:
        plt.close(fig)


def _edges(centers: Sequence[int]) -> np.ndarray:
    c = np.asarray(centers, dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[:-1] + c[1:]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def write_plots(report: TrainingReport, out_dir: Path) -> dict[str, Path]:
    """Writes the PNG plots into ``out_dir`` (atomically); returns name -> path of those written (empty without
    matplotlib)."""
    plt = pyplot()
    if plt is None:
        return {}
    written: dict[str, Path] = {}
    if report.adv_k:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        mesh = ax.pcolormesh(_edges(report.adv_steps), _edges(report.adv_k), np.ma.masked_invalid(report.adv_loss),
                             cmap="viridis", shading="flat")
        fig.colorbar(mesh, ax=ax, label="adversary loss")
        ax.set_xlabel("outer step")
        ax.set_ylabel("inner step k")
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_title("Adversary loss at each inner step across training")
        fig.tight_layout()
        written["adv_heatmap"] = _save(fig, plt, out_dir / PLOTS["adv_heatmap"])

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for k in curve_ks(report.adv_k):
            row = report.adv_loss[report.adv_k.index(k)]
            ok = np.isfinite(row)
            ax.plot(np.asarray(report.adv_steps)[ok], row[ok], marker=".", label=f"k = {k}")
        ax.set_xlabel("outer step")
        ax.set_ylabel("adversary loss")
        ax.set_title("Adversary loss at a few inner steps")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["adv_curves"] = _save(fig, plt, out_dir / PLOTS["adv_curves"])

    if report.tr_points:
        panels = 2 if report.diag_name else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
        for ax, grid, label in ((axes[0][0], report.tr_loss, "TR loss"),
                                *(((axes[0][1], report.diag, report.diag_name),) if report.diag_name else ())):
            for i, k in enumerate(report.tr_points):
                ok = np.isfinite(grid[i])
                ax.plot(np.asarray(report.tr_steps)[ok], grid[i][ok], marker=".", label=f"k = {k}")
            ax.set_xlabel("outer step")
            ax.set_ylabel(label)
            ax.set_title(f"{label} at each evaluation point")
            ax.legend(fontsize=8)
        fig.tight_layout()
        written["tr_points"] = _save(fig, plt, out_dir / PLOTS["tr_points"])

    retain = [name for name in RETAIN if name in report.series]
    if retain:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in retain:
            xs, ys = report.series[name]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_xlabel("outer step")
        ax.set_ylabel("loss")
        ax.set_title("Retain loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["retain"] = _save(fig, plt, out_dir / PLOTS["retain"])

    pool = [name for name in POOL if name in report.series]
    if pool:
        fig, axes = plt.subplots(1, len(pool), figsize=(6 * len(pool), 4), squeeze=False)
        for ax, name in zip(axes[0], pool, strict=True):
            xs, ys = report.series[name]
            ax.plot(xs, ys, marker=".")
            ax.set_xlabel("outer step")
            ax.set_title(name + (" (share of trajectories continued)" if name.endswith("continued") else ""))
        fig.tight_layout()
        written["pool"] = _save(fig, plt, out_dir / PLOTS["pool"])
    return written


def default_out(run: Union[str, Path]) -> Path:
    """The default report folder: ``<run>/report`` (next to the file when ``run`` is a log file)."""
    run = Path(run).expanduser()
    return (run.parent if run.is_file() else run) / "report"


def training_report(
    run: Union[str, Path], out: Union[None, str, Path] = None, *, overwrite: bool = False, plots: bool = True
) -> TrainingReport:
    """Reads the TAR metrics of ``run`` and writes the plots and ``report.md`` into ``out``.

    Args:
        run: the run folder (``--trainer.default_root_dir``; its logs are found below it), a log folder, a
            ``metrics.csv`` or a TensorBoard event file.
        out: the report folder (default: ``<run>/report``).
        overwrite: replace the report files of a non-empty ``out`` (without it such an ``out`` is refused).
        plots: write the PNG plots (they also need matplotlib).

    Returns:
        The :class:`TrainingReport`, with the heatmap's arrays and the files written.

    Raises:
        DataError: ``run`` does not exist, or holds no TAR metrics, or a log cannot be read.
        ConfigError: ``out`` exists, is not empty, and ``overwrite`` is false.
        CheckpointWriteError: a file cannot be written.
    """
    run = Path(run).expanduser()
    out_dir = default_out(run) if out is None else Path(out).expanduser()
    log_ = read_training_log(run)  # first: a run without TAR metrics is refused before anything is written
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"training report: --out {str(out_dir)!r} is a file; expected a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise ConfigError(f"training report: --out {str(out_dir)!r} already exists and is not empty; pass "
                              f"--overwrite to replace its report, or choose another --out")
    report = _collect(run, out_dir, log_)
    if plots:
        report.files.update(write_plots(report, out_dir))
    for name, filename in PLOTS.items():  # a previous report's plot this run no longer has
        stale = out_dir / filename
        if name not in report.files and stale.is_file():
            stale.unlink()
    report.files["report.md"] = atomic_write_text(out_dir / REPORT_MD, training_markdown(report),
                                                  what="training report")
    return report
