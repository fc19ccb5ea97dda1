"""The demo's stages on several worker processes (``workers: 2`` in ``recipes/demo/default.yaml``).

The demo is a graph of jobs: stage 0 → random mapping → TAR once per family (and stage 0 → RMU, Max-Entropy,
Min-Posterior with ``rmu.enabled``, ``max_entropy.enabled``, ``min_posterior.enabled``), and every defense's
red-team attacks need only the model of its own stage.
:func:`run_stages_in_workers` trains stage 0 in this process while ``workers`` spawned processes (each with
``threads`` torch threads) start, then runs the rest of the graph on them. Whenever a process is free it takes
the ready job that comes first: training stages (a stage unlocks more work), the collection of a red team whose
runs are all done, then attacks, longest first. On two CPU cores, two one-thread processes do twice the work of
one process at 1 thread (tiny models do not speed up with a second thread), so everything after stage 0 takes
about half as long.

The numbers do not depend on ``workers``: every stage seeds itself and reads its parent's weights from the
folder the parent exported (the same bytes a one-process run holds in memory), and every attack run is seeded
by its own run seed. Stage and run files are the ones a one-process run writes, so the two modes resume each
other's work. The worker processes key the stages with the parent's code fingerprints
(:meth:`~tar_lightning.demo.pipeline.DemoPipeline.code_fingerprints`). Progress: one bar per training stage
(steps) and per red team (runs), drawn by the parent with :func:`~tar_lightning.evaluation.progress.progress`
(plain lines, no escape codes, when stderr is not a terminal).

This module imports :mod:`tar_lightning.demo.pipeline`, never the other way round: :func:`~tar_lightning.demo.run.run_demo`
chooses between :meth:`DemoPipeline.run_in_process` and :func:`run_stages_in_workers`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_mod
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch
from tqdm import tqdm

from tar_lightning.demo.config import DemoConfig
from tar_lightning.demo.io import silence_lightning
from tar_lightning.demo.pipeline import DemoPipeline, stage_label
from tar_lightning.demo.report import DemoResult
from tar_lightning.errors import TARLightningError
from tar_lightning.evaluation.progress import PlainProgress, progress
from tar_lightning.evaluation.redteam import run_redteam
from tar_lightning.safeguards.unlearn import FORGET_LOSSES

__all__ = ["run_stages_in_workers"]

#: The worker process's demo, message queue and loaded stage models.
_STATE: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------ worker side
class _Reporter(L.Callback):
    """Sends ``("step", stage, done, total)`` to the parent's queue at most twice a second."""

    def __init__(self, queue: Any, name: str, total: int) -> None:
        self.queue, self.name, self.total = queue, name, total
        self.done, self.last = 0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= 0.5 or self.done >= self.total:
            self.last = now
            self.queue.put(("step", self.name, self.done, self.total))


def _init(config: dict, queue: Any, code: dict[str, str]) -> None:
    cfg = DemoConfig.from_dict({**config, "progress": False})
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    silence_lightning()
    _STATE["queue"] = queue
    _STATE["models"] = {}
    _STATE["demo"] = DemoPipeline(
        cfg,
        say=lambda text: queue.put(("say", text)),
        train_callbacks=lambda name, steps: [_Reporter(queue, name, steps)],
        code=code,  # the parent's: every process keys the stages alike
    )


def _ready() -> None:
    """Started at once on every worker, so the processes import and build their demo while stage 0 trains."""


def _stage_job(name: str) -> dict:
    demo = _STATE["demo"]
    demo.result = DemoResult(config=demo.cfg, out_dir=demo.out)
    if name == "stage0":
        demo.stage0()
    elif name == "random_mapping":
        demo.stage_rm(*demo.load_stage("stage0"))
    elif name == "rmu":
        demo.stage_rmu(*demo.load_stage("stage0"))
    elif name in FORGET_LOSSES:
        demo.stage_unlearn(name, *demo.load_stage("stage0"))
    else:
        demo.stage_tar(name[len("tar_"):], *demo.load_stage("random_mapping"))
    return {"meta": demo.result.stages[name], "cached": name in demo.result.cached}


def _model(stage: str) -> tuple[Any, Any]:
    demo = _STATE["demo"]
    h = demo.keys()[stage][1]
    held = _STATE["models"].get(stage)
    if held is None or held[0] != h:
        held = _STATE["models"][stage] = (h, *demo.load_stage(stage))
    held[1].eval()
    return held[1], held[2]


def _attack_job(defense: str, stage: str, attack: str) -> dict:
    demo = _STATE["demo"]
    model, tok = _model(stage)
    start = time.perf_counter()
    res = run_redteam(
        model, demo.suite().select([attack]), out_dir=demo.out / "redteam" / defense, tokenizer=tok,
        evaluator=demo.evaluator, device="cpu", progress=False, report=False,
        overwrite=True,  # the demo keys its folders itself: a changed defense replaces its old red team
    )
    return {"runs": len(res.runs), "computed": len(res.computed), "wall_time_s": time.perf_counter() - start}


def _collect_job(defense: str, stage: str, compute_s: float) -> dict:
    """A defense's red team once all its runs are on disk: aggregate, report and plots (nothing is computed)."""
    demo = _STATE["demo"]
    demo.result = DemoResult(config=demo.cfg, out_dir=demo.out)
    return demo.redteam(defense, *_model(stage), compute_s=compute_s)


# ------------------------------------------------------------------------------------------ parent side
@dataclass
class _Job:
    name: str
    fn: Any
    args: tuple
    deps: list[str]
    rank: tuple
    defense: Optional[str] = None
    runs: int = 0


@dataclass
class _Bars:
    """The parent's bars (one per training stage and per red team, :func:`~tar_lightning.evaluation.progress.
    progress`: tqdm on a terminal, plain lines otherwise); nothing when disabled."""

    enabled: bool
    bars: dict[str, Any] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)

    def update(self, key: str, label: str, done: int, total: int, unit: str) -> None:
        if not self.enabled or key in self.finished:
            return
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = progress(total=total, desc=label, unit=unit, position=len(self.bars))
        bar.update(done - bar.n)

    def finish(self, key: str) -> None:
        """Stops the clock of a finished bar (it stays on screen); later updates of it are ignored."""
        bar = self.bars.get(key)
        if bar is not None and key not in self.finished:
            self.finished.add(key)
            bar.close()

    def write(self, text: str) -> None:
        """A line of text that does not break the bars (tqdm's ``write`` while terminal bars are shown)."""
        if any(not isinstance(bar, PlainProgress) for bar in self.bars.values()):
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for key in list(self.bars):
            self.finish(key)
        self.bars.clear()


def _jobs(demo: DemoPipeline) -> list[_Job]:
    """The jobs still to do: uncached training stages, then per uncached red team its attacks and the collection
    of their runs."""
    stages = list(demo.keys())
    # the stage-1 defenses start from stage 0; anything else (TAR) from random_mapping
    parent = {"stage0": None, "random_mapping": "stage0", "rmu": "stage0", **dict.fromkeys(FORGET_LOSSES, "stage0")}
    jobs: list[_Job] = []
    todo: set[str] = set()
    for i, name in enumerate(stages):
        meta = demo.cached_stage(name)
        if meta is not None:
            demo.result.stages[name] = {**meta, "cached": True}
            demo.result.cached.append(name)
            continue
        up = parent.get(name, "random_mapping")
        jobs.append(_Job(name, _stage_job, (name,), [up] if up in todo else [], (0, i)))
        todo.add(name)
    suite = demo.suite()
    for i, (defense, stage) in enumerate(demo.defenses().items()):
        if demo.cached_redteam(defense) is not None:
            continue
        demo.discard_stale_redteam(defense)
        attacks = []
        for j, attack in enumerate(suite.attacks):
            # Longest attacks first (LoRA before full fine-tuning of the same length), short ones fill the end.
            steps = int(attack.adversary.steps or 0)
            rank = (2, -steps, attack.adversary.method != "lora", i, j)
            attacks.append(_Job(
                f"{defense}/{attack.id}", _attack_job, (defense, stage, attack.id),
                [stage] if stage in todo else [], rank, defense, len(suite.seeds_of(attack)),
            ))
        jobs.extend(attacks)
        jobs.append(_Job(f"{defense}/collect", _collect_job, (defense, stage), [j.name for j in attacks], (1, i),
                         defense))
    return jobs


def _stop(pool) -> None:
    """Cancels what has not started and stops the worker processes (a failed job or Ctrl-C)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
    else:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def run_stages_in_workers(demo: DemoPipeline) -> dict:
    """Runs every stage of ``demo``: stage 0 in this process while the ``demo.cfg.workers`` worker processes
    start, everything else on the workers.

    Returns:
        defense -> red-team metadata, as the one-process run builds it.

    Raises:
        TARLightningError: a worker process died; any error a job raised, as raised.
    """
    cfg = demo.cfg
    jobs = _jobs(demo)
    bars = _Bars(bool(cfg.progress))
    defenses = demo.defenses()
    reds = {}
    for defense in defenses:
        meta = demo.cached_redteam(defense)
        if meta is not None:
            reds[defense] = meta
            demo.result.stages[f"redteam_{defense}"] = {"hash": meta["hash"], "wall_time_s": meta["wall_time_s"],
                                                        "cached": True}
            demo.result.cached.append(f"redteam_{defense}")
    if not jobs:
        return reds
    red_runs = dict.fromkeys(defenses, 0)
    red_total = {d: sum(j.runs for j in jobs if j.defense == d) for d in defenses}
    red_compute = dict.fromkeys(defenses, 0.0)

    def handle(msg: Sequence) -> None:
        if msg[0] == "say":
            bars.write(msg[1])
        elif msg[0] == "step":
            _, name, done, total = msg
            bars.update(name, stage_label(name), done, total, "step")

    def drain(messages) -> None:
        while True:
            try:
                handle(messages.get_nowait())
            except queue_mod.Empty:
                return

    def finish(job: _Job, out: dict) -> None:
        if job.fn is _stage_job:
            demo.result.stages[job.name] = {**out["meta"], "cached": out["cached"]}
            (demo.result.cached if out["cached"] else demo.result.ran).append(job.name)
            bars.finish(job.name)
        elif job.fn is _attack_job:
            red_runs[job.defense] += out["runs"]
            red_compute[job.defense] += out["wall_time_s"]
            bars.update(f"red:{job.defense}", f"stage 3: red team {job.defense}", red_runs[job.defense],
                        red_total[job.defense], "run")
        else:
            reds[job.defense] = out
            bars.finish(f"red:{job.defense}")
            name = f"redteam_{job.defense}"
            demo.result.stages[name] = {"hash": out["hash"], "wall_time_s": out["wall_time_s"], "cached": False}
            demo.result.ran.append(name)

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    n = max(1, min(cfg.workers, sum(j.fn is not _collect_job for j in jobs)))
    pool = ProcessPoolExecutor(
        max_workers=n, mp_context=ctx, initializer=_init,
        initargs=({**dataclasses.asdict(cfg), "out": str(demo.out)}, messages, demo.code_fingerprints()),
    )
    pending = {j.name: j for j in jobs}
    running: dict[Any, _Job] = {}
    finished: set[str] = set()
    announced: set[str] = set()
    try:
        for _ in range(n):  # the workers start (imports, the demo's data) while stage 0 runs here
            pool.submit(_ready)
        if "stage0" in pending:
            job = pending.pop("stage0")
            local = DemoPipeline(
                dataclasses.replace(cfg, progress=False), say=bars.write,
                train_callbacks=lambda name, steps: [_Reporter(_Local(handle), name, steps)],
                code=demo.code_fingerprints(),
            )
            local.stage0()
            finish(job, {"meta": local.result.stages["stage0"], "cached": "stage0" in local.result.cached})
            finished.add(job.name)
            del local
        while pending or running:
            ready = sorted((j for j in pending.values() if all(d in finished for d in j.deps)), key=lambda j: j.rank)
            for job in ready[: n - len(running)]:
                del pending[job.name]
                args = job.args + ((red_compute[job.defense],) if job.fn is _collect_job else ())
                running[pool.submit(job.fn, *args)] = job
                if job.fn is _attack_job and job.defense not in announced:
                    announced.add(job.defense)
                    bars.write(f"[demo] stage 3: red team on {job.defense} ({red_total[job.defense]} attack runs)")
                    bars.update(f"red:{job.defense}", f"stage 3: red team {job.defense}", 0,
                                red_total[job.defense], "run")
            if not running:
                raise TARLightningError(f"demo: jobs {sorted(pending)} wait on stages that never ran")
            done, _ = wait(list(running), timeout=0.25, return_when=FIRST_COMPLETED)
            drain(messages)
            for fut in done:
                job = running.pop(fut)
                finish(job, fut.result())
                finished.add(job.name)
    except BrokenProcessPool as err:
        _stop(pool)
        raise TARLightningError(
            f"demo: a worker process died ({err}); out of memory? Try workers: 1 (--workers 1)"
        ) from None
    except BaseException:
        _stop(pool)
        raise
    finally:
        bars.close()
    pool.shutdown(wait=True)
    drain(messages)  # lines sent just before the last job ended
    return reds


class _Local:
    """A queue stand-in for stage 0 in this process: messages go straight to the bars."""

    def __init__(self, handle) -> None:
        self.put = handle
