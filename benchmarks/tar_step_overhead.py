"""Per-step overhead of ``TARModule`` over the bare compute of a TAR outer step, and its peak memory.

Method
------
*Time.* One TAR outer step (K adversary steps, a tamper-resistance (TR) loss every ``tr_every`` steps, one
retain step, one outer optimizer step) is timed in three variants, on the same batches (``floor`` and ``tar``
even share the model object, so that memory placement cannot differ):

- ``floor``: the same passes written as a plain PyTorch loop, no Lightning and no library code: clone the
  parameters (snapshot); K adversary forward/backward passes with ``torch.optim.AdamW`` steps on a fresh AdamW;
  K/tr_every max-entropy TR forward/backward passes (entropy written inline) whose gradients accumulate into a
  buffer; restore the parameters; one retain forward/backward (``F.cross_entropy``); add the buffer; one outer
  AdamW step. This is the compute floor of the step.
- ``tar``: ``TARModule.training_step`` driven by a real ``lightning.Trainer`` (cpu, no logger, no checkpointing,
  no progress bar, no model summary), outer optimizer ``torch.optim.AdamW`` as in the floor (apples to apples).
  A callback records ``time.perf_counter()`` at ``on_train_batch_start`` / ``on_train_batch_end``; the gap
  between one batch's end and the next batch's start (data fetching, Lightning's loop and metric bookkeeping)
  is reported separately.
- ``tar_sf``: as ``tar`` with the library's default outer optimizer (schedule-free AdamW); secondary line.

``--floor-losses library`` swaps the library's loss functions into the floor (otherwise untouched): the library's
fused entropy is cheaper than the inline ``-(softmax * log_softmax).sum(-1)``, so with the default inline losses
the ratio mixes framework overhead with that loss-implementation difference (it can come out below 1).

The variants are *interleaved*: every round runs one block of each variant (order rotated per round), so load
from other processes on this shared machine hits all of them alike. Each block starts with a fresh outer
optimizer (a fresh Trainer for the TAR variants, whose ``configure_optimizers`` builds a new one; a new AdamW for
the floor) and its first ``--block-warmup`` steps are discarded. The reported ratio is
``median(tar step) / median(floor step)``; the median of the per-round ratios is shown as a drift-robust check.

*Memory.* Peak RSS growth, measured in separate subprocesses (started together once the timing is done) so that
peaks do not contaminate each other: the
peak resident set during the steps (``VmHWM``, reset through ``/proc/self/clear_refs`` right before them) minus
the resident set before them (after imports, model and data are built). ``ru_maxrss`` alone cannot be used: it is
a lifetime peak that holds the import-time spike and, because ``subprocess`` starts children with vfork+exec, even
the parent's peak. Workers: ``finetune`` (plain fwd/bwd/AdamW loop on one micro-batch of the same shape),
``tar_floor`` (the floor loop above) and ``tar`` (``TARModule`` through a Trainer). RSS also counts heap pages
glibc keeps after ``free``; run with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment to see live memory only.

Usage::

    python benchmarks/tar_step_overhead.py            # ~3 min on a shared 2-core CPU
    python benchmarks/tar_step_overhead.py --quick    # ~40 s, no schedule-free line, two memory workers
    python benchmarks/tar_step_overhead.py --out results.json

The last line printed is ``overhead_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _bench_model import add_model_arguments, build_model  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tar_lightning import AdversaryConfig, TARConfig, TARModule  # noqa: E402
from tar_lightning.losses import causal_lm_loss, max_entropy_loss  # noqa: E402

# The TAR hyperparameters held fixed (the library's defaults where it has them).
ADV_LR = 2e-5  # AdversaryConfig default, constant schedule
OUTER_LR = 2e-5  # the library's default outer LR
WEIGHT_DECAY = 0.01  # torch AdamW default = AdversaryConfig default
TR_WEIGHT = 4.0  # λ_TR (TARConfig default)
RETAIN_WEIGHT = 1.0  # λ_retain
WEIGHTING_RATE = 0.0625  # exponential TR weighting (TARConfig default)
STREAMS = ("forget", "tr", "retain")
VARIANTS = ("floor", "tar", "tar_sf")
MEMORY_WORKERS = ("finetune", "tar_floor", "tar")
# the options a memory worker subprocess inherits from the parent
WORKER_ARGS = (
    "hidden_size",
    "intermediate_size",
    "layers",
    "heads",
    "vocab_size",
    "batch_size",
    "seq_len",
    "inner_steps",
    "tr_every",
    "threads",
    "mem_steps",
    "floor_losses",
)
MIB = 2**20

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


# -- setup ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_arguments(p)
    p.add_argument("--inner-steps", type=int, default=8, help="K")
    p.add_argument("--tr-every", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one block of each variant)")
    p.add_argument("--steps-per-block", type=int, default=3, help="measured steps per block")
    p.add_argument("--block-warmup", type=int, default=1, help="discarded steps at the start of every block")
    p.add_argument("--warmup-rounds", type=int, default=0, help="whole rounds run first and discarded")
    p.add_argument("--mem-steps", type=int, default=3, help="outer steps per memory worker (>= 2)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: fastest on a shared 2-core box)"
    )
    p.add_argument(
        "--floor-losses",
        choices=("inline", "library"),
        default="inline",
        help="inline: the floor's losses in plain torch (default); library: the library's loss functions, so that\n"
        "the ratio isolates the framework overhead from loss-implementation differences",
    )
    p.add_argument(
        "--skip-schedule-free", action="store_true", help="do not time the schedule-free outer optimizer"
    )
    p.add_argument("--skip-memory", action="store_true", help="do not run the memory subprocesses")
    p.add_argument(
        "--quick",
        action="store_true",
        help="~40 s: 1 warm-up + 3 rounds of 1 step, no schedule-free, 2 memory workers",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory-worker", choices=MEMORY_WORKERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps_per_block, args.block_warmup, args.warmup_rounds = 3, 1, 0, 1
        args.mem_steps, args.skip_schedule_free = 2, True
    if min(args.rounds, args.steps_per_block) < 1 or min(args.block_warmup, args.warmup_rounds) < 0:
        p.error("--rounds and --steps-per-block must be >= 1, --block-warmup and --warmup-rounds >= 0")
    if args.mem_steps < 2:
        p.error(
            "--mem-steps must be >= 2 (TAR's peak is in the second step, once the outer AdamW state exists)"
        )
    return args


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and its advice about DataLoader workers and logging intervals."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def make_bundle(args: argparse.Namespace, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """One outer step's data: ``{stream: {input_ids, attention_mask, labels}: [n, batch, seq_len]}``."""
    g = torch.Generator().manual_seed(seed)
    counts = {"forget": args.inner_steps, "tr": 1, "retain": 1}
    bundle = {}
    for name in STREAMS:
        ids = torch.randint(3, args.vocab_size, (counts[name], args.batch_size, args.seq_len), generator=g)
        bundle[name] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return bundle


def micro(bundle: dict, stream: str, i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in bundle[stream].items()}


def tar_config(args: argparse.Namespace) -> TARConfig:
    return TARConfig(
        inner_steps=args.inner_steps,
        tr_every=args.tr_every,
        tr_loss="max_entropy",
        tr_weight=TR_WEIGHT,
        retain_weight=RETAIN_WEIGHT,
        weighting="exponential",
        weighting_rate=WEIGHTING_RATE,
        retain_representation=False,
        adversaries=[AdversaryConfig(name="adamw", data="forget", lr=ADV_LR, weight_decay=WEIGHT_DECAY)],
    )


def torch_adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=OUTER_LR, weight_decay=WEIGHT_DECAY)


def build_tar_module(args: argparse.Namespace, schedule_free: bool) -> TARModule:
    # optimizer=None: the library's default outer optimizer (schedule-free AdamW, lr 2e-5, 32 warmup steps)
    return TARModule(build_model(args), tar_config(args), optimizer=None if schedule_free else torch_adamw)


# -- the compute floor: plain PyTorch -----------------------------------------------------------------------


def lm_ce(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(), ignore_index=-100
    )


def neg_entropy(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Minus the mean predictive entropy over the attended positions."""
    logits = model(
        input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False
    ).logits.float()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    mask = mb["attention_mask"].to(entropy.dtype)
    return -(entropy * mask).sum() / mask.sum().clamp_min(1.0)


def library_lm_ce(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """``--floor-losses library``: the library's CE (what TARModule's adversary and retain passes use)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
    return causal_lm_loss(logits, mb["labels"])


def library_neg_entropy(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """``--floor-losses library``: the library's max-entropy TR loss (a fused entropy with analytic backward)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
    return max_entropy_loss(logits, mb["attention_mask"], mb["labels"])


def floor_losses(name: str) -> tuple[LossFn, LossFn]:
    """(CE, TR loss) of the floor: plain torch (``inline``) or the library's loss functions (``library``), which
    leaves only the framework (Lightning + TARModule bookkeeping) in the ratio."""
    return (lm_ce, neg_entropy) if name == "inline" else (library_lm_ce, library_neg_entropy)


def tr_weights(inner_steps: int, tr_every: int) -> dict[int, float]:
    """{k: w_k} for the TR points, w_k = exp(rate * (k - (K - 1))), newest heaviest."""
    return {
        k: math.exp(WEIGHTING_RATE * (k - (inner_steps - 1)))
        for k in range(inner_steps)
        if (k + 1) % tr_every == 0
    }


def floor_outer_step(
    model,
    params,
    outer_opt,
    bundle,
    inner_steps: int,
    weights: dict[int, float],
    losses: tuple[LossFn, LossFn],
) -> None:
    """One TAR outer step in plain PyTorch (first order, one trajectory)."""
    ce, tr_loss = losses
    with torch.no_grad():
        snapshot = [p.detach().clone() for p in params]
    tr_grads: list = [None] * len(params)
    inner_opt = torch.optim.AdamW(params, lr=ADV_LR, weight_decay=WEIGHT_DECAY)
    tr_batch = micro(bundle, "tr", 0)
    for k in range(inner_steps):
        ce(model, micro(bundle, "forget", k)).backward()
        inner_opt.step()
        inner_opt.zero_grad(set_to_none=True)
        if k in weights:
            # accumulate into the buffer: swapped into .grad, autograd adds the TR gradient to it in place
            for p, g in zip(params, tr_grads, strict=True):
                p.grad = g
            (tr_loss(model, tr_batch) * (TR_WEIGHT * weights[k])).backward()
            for i, p in enumerate(params):
                tr_grads[i], p.grad = p.grad, None
    del inner_opt
    with torch.no_grad():
        for p, s in zip(params, snapshot, strict=True):
            p.copy_(s)
    del snapshot
    for p, g in zip(params, tr_grads, strict=True):
        p.grad = g
    (RETAIN_WEIGHT * ce(model, micro(bundle, "retain", 0))).backward()
    outer_opt.step()
    outer_opt.zero_grad(set_to_none=True)


def floor_block(model, bundles: list, args: argparse.Namespace) -> list[float]:
    """Per-step wall times of ``len(bundles)`` floor steps with a fresh outer AdamW (as a fresh Trainer has)."""
    params = [p for p in model.parameters() if p.requires_grad]
    outer_opt = torch_adamw(params)
    weights = tr_weights(args.inner_steps, args.tr_every)
    losses = floor_losses(args.floor_losses)
    times = []
    for bundle in bundles:
        t0 = time.perf_counter()
        floor_outer_step(model, params, outer_opt, bundle, args.inner_steps, weights, losses)
        times.append(time.perf_counter() - t0)
    return times


# -- TARModule through a Trainer ------------------------------------------------------------------------------


class StepTimer(Callback):
    """Wall time of every training batch (``on_train_batch_start`` → ``on_train_batch_end``) and of the gaps
    between consecutive batches."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.gaps: list[float] = []
        self._start = 0.0
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self.gaps.append(self._start - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        self.times.append(self._last_end - self._start)


def make_trainer(max_steps: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        callbacks=callbacks or [],
    )


def tar_block(module: TARModule, bundles: list) -> tuple[list[float], list[float]]:
    """Per-step wall times (and inter-batch gaps) of ``len(bundles)`` outer steps in a fresh Trainer."""
    timer = StepTimer()
    make_trainer(len(bundles), [timer]).fit(module, DataLoader(bundles, batch_size=None))
    return timer.times, timer.gaps


# -- timing -------------------------------------------------------------------------------------------------


def summarize(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "n": len(xs)}


def run_timing(args: argparse.Namespace) -> dict:
    variants = [v for v in VARIANTS if not (v == "tar_sf" and args.skip_schedule_free)]
    n = args.block_warmup + args.steps_per_block
    bundles = [make_bundle(args, seed) for seed in range(n)]
    modules = {"tar": build_tar_module(args, schedule_free=False)}
    # The floor runs on the very model object the `tar` variant trains: two identically initialised instances
    # differ by ~1% in speed (memory placement), which would blur a ratio that is meant to resolve ~1%.
    floor_model = modules["tar"].model
    if "tar_sf" in variants:
        modules["tar_sf"] = build_tar_module(args, schedule_free=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    gaps: dict[str, list[float]] = {v: [] for v in variants if v != "floor"}
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(-args.warmup_rounds, args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            if v == "floor":
                block = floor_block(floor_model, bundles, args)
            else:
                block, block_gaps = tar_block(modules[v], bundles)
            if torch.get_num_threads() != args.threads:
                raise RuntimeError(f"thread count changed to {torch.get_num_threads()} during {v}")
            if r < 0:
                continue
            if v != "floor":
                gaps[v] += block_gaps[args.block_warmup :]
            kept = block[args.block_warmup :]
            times[v] += kept
            per_round[v].append(statistics.median(kept))
        if r < 0:
            print(f"  warm-up round {r + args.warmup_rounds + 1}/{args.warmup_rounds} done", flush=True)
            continue
        done = ", ".join(f"{v} {statistics.median(times[v]):.3f}s" for v in variants)
        print(f"  round {r + 1}/{args.rounds}: running medians {done}", flush=True)
    floor_med = statistics.median(times["floor"])
    result = {"n_params": sum(p.numel() for p in floor_model.parameters()), "variants": {}}
    for v in variants:
        entry = summarize(times[v])
        entry["times"] = times[v]
        entry["ratio_to_floor"] = entry["median"] / floor_med
        entry["paired_ratio"] = statistics.median(
            a / b for a, b in zip(per_round[v], per_round["floor"], strict=True)
        )
        if v in gaps and gaps[v]:
            entry["gap_median"] = statistics.median(gaps[v])
            entry["ratio_with_gap"] = (entry["median"] + entry["gap_median"]) / floor_med
        result["variants"][v] = entry
    return result


# -- memory ---------------------------------------------------------------------------------------------------


def rss_status() -> dict[str, int]:
    """Current (``VmRSS``) and peak (``VmHWM``) resident set of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(args: argparse.Namespace) -> None:
    """Run in a subprocess: report the peak RSS growth of ``args.mem_steps`` steps of one workload as JSON."""
    kind = args.memory_worker
    bundles = [make_bundle(args, seed) for seed in range(args.mem_steps)]
    if kind == "tar":
        module = build_tar_module(args, schedule_free=False)
        trainer = make_trainer(args.mem_steps)
        loader = DataLoader(bundles, batch_size=None)

        def run() -> None:
            trainer.fit(module, loader)

        n_params = sum(p.numel() for p in module.trainable_parameters())
    else:
        model = build_model(args)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch_adamw(params)
        n_params = sum(p.numel() for p in params)
        weights = tr_weights(args.inner_steps, args.tr_every)
        losses = floor_losses(args.floor_losses)

        def run() -> None:
            for bundle in bundles:
                if kind == "finetune":
                    losses[0](model, micro(bundle, "forget", 0)).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    floor_outer_step(model, params, opt, bundle, args.inner_steps, weights, losses)

    gc.collect()
    # ru_maxrss (and VmHWM without a reset) is a lifetime peak: it holds the import-time peak and, through the
    # vfork+exec of subprocess, even the *parent's* peak. Resetting VmHWM makes the peak that of the steps alone.
    was_reset = reset_peak_rss()
    before = rss_status()
    run()
    after = rss_status()
    print(
        json.dumps(
            {
                "kind": kind,
                "base": before["VmRSS"],
                "peak_before": before["VmHWM"],
                "peak": after["VmHWM"],
                "peak_reset": was_reset,
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "n_params": n_params,
            }
        )
    )


def run_memory(args: argparse.Namespace) -> dict:
    kinds = ("finetune", "tar") if args.quick else MEMORY_WORKERS
    forward = [x for name in WORKER_ARGS for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    # Run concurrently: each worker's peak is its own, only the wall time is shared (timing is over by now).
    procs = {
        kind: subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--memory-worker", kind, *forward],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in kinds
    }
    out = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {kind!r} failed:\n{stderr[-4000:]}")
        rec = json.loads(stdout.strip().splitlines()[-1])
        rec["growth"] = rec["peak"] - rec["base"]
        # without the reset, a peak that did not rise during the steps is an upper bound only
        rec["reliable"] = rec["peak_reset"] or rec["peak"] > rec["peak_before"]
        out[kind] = rec
        print(f"  memory worker {kind}: +{rec['growth'] / MIB:.1f} MiB", flush=True)
    return out


# -- report ---------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, timing: dict, memory: dict | None, wall: float) -> float:
    v = timing["variants"]
    floor = v["floor"]["median"]
    n_params = timing["n_params"]
    P = n_params * 4  # fp32 bytes of one copy of the parameters
    K, E = args.inner_steps, len(tr_weights(args.inner_steps, args.tr_every))
    print()
    print(
        f"model: Llama hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.layers} layers, "
        f"{args.heads} heads (kv {args.heads}), vocab {args.vocab_size}, {n_params / 1e6:.2f} M params fp32; "
        f"batch {args.batch_size}x{args.seq_len}"
    )
    print(
        f"step: K={K} AdamW adversary steps (lr {ADV_LR}, constant), {E} max-entropy TR passes (tr_every "
        f"{args.tr_every}), 1 retain pass = {K + E + 1} fwd/bwd; torch threads {args.threads}"
    )
    print(
        f"timing: {args.rounds} interleaved rounds x {args.steps_per_block} measured steps per variant "
        f"(+{args.block_warmup} discarded per block, {args.warmup_rounds} discarded warm-up rounds); "
        f"floor losses: {args.floor_losses}"
    )
    print()
    header = (
        f"{'variant':<34}{'median ms':>10}{'p25':>9}{'p75':>9}{'min':>9}{'n':>4}{'Δ ms':>8}{'ratio':>8}"
        f"{'paired':>8}"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "floor": "floor (plain torch, AdamW outer)"
        if args.floor_losses == "inline"
        else "floor (library losses)",
        "tar": "TARModule+Trainer, AdamW outer",
        "tar_sf": "TARModule+Trainer, schedule-free",
    }
    for name, e in v.items():
        print(
            f"{labels[name]:<34}{e['median'] * 1e3:>10.1f}{e['p25'] * 1e3:>9.1f}{e['p75'] * 1e3:>9.1f}"
            f"{e['min'] * 1e3:>9.1f}{e['n']:>4}{(e['median'] - floor) * 1e3:>+8.1f}"
            f"{e['ratio_to_floor']:>8.3f}{e['paired_ratio']:>8.3f}"
        )
    for name, e in v.items():
        if "gap_median" in e:
            print(
                f"  {name}: median inter-batch gap {e['gap_median'] * 1e3:.1f} ms "
                f"(step + gap vs floor: {e['ratio_with_gap']:.3f})"
            )
    print("  Δ = median - floor median; ratio = median / floor median;")
    print("  paired = median over rounds of (block median / the round's floor block median)")
    if memory:
        print()
        print(f"peak RSS growth over the steps (P = one fp32 copy of the parameters = {P / MIB:.1f} MiB):")
        for kind, rec in memory.items():
            flag = "" if rec["reliable"] else "  (upper bound: lifetime peak predates the steps)"
            print(
                f"  {kind:<10} +{rec['growth'] / MIB:8.1f} MiB = {rec['growth'] / P:5.2f} P   "
                f"(absolute peak {rec['peak'] / MIB:.0f} MiB){flag}"
            )
        ft = memory["finetune"]["growth"]
        for kind in ("tar_floor", "tar"):
            if kind in memory:
                print(f"  {kind} / finetune growth: {memory[kind]['growth'] / ft:.2f}")
        if "tar_floor" in memory and "tar" in memory:
            extra = memory["tar"]["growth"] - memory["tar_floor"]["growth"]
            print(f"  library + Lightning extra over the plain TAR loop: {extra / MIB:+.1f} MiB")
        act = ft - 3 * P
        print(
            "  expected: fine-tuning holds grads + AdamW state = 3 P plus activations "
            f"(here ~{act / MIB:.0f} MiB = growth - 3 P);\n"
            "  TAR additionally holds, during its inner loop, the snapshot (1 P), the TR gradient buffer (1 P) and the\n"
            "  inner AdamW state (2 P) next to the outer AdamW state (2 P) and the inner grads (1 P): 7 P + activations,\n"
            f"  i.e. ~{(7 * P + act) / MIB:.0f} MiB, a ratio of ~{(7 * P + act) / ft:.2f} with these activations.\n"
            "  RSS also holds heap pages glibc keeps after free (more so for TAR's many parameter-sized buffers);\n"
            "  MALLOC_MMAP_THRESHOLD_=65536 in the environment makes the growth track live tensors."
        )
    print()
    print(f"wall time of this run: {wall:.0f} s")
    ratio = v["tar"]["ratio_to_floor"]
    print(f"overhead_ratio={ratio:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    if args.memory_worker:
        memory_worker(args)
        return
    start = time.perf_counter()
    print(f"timing with {args.threads} torch thread(s)...", flush=True)
    timing = run_timing(args)
    memory = None if args.skip_memory else run_memory(args)
    wall = time.perf_counter() - start
    ratio = report(args, timing, memory, wall)
    if args.out:
        results = {
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "memory_worker")},
            "timing": timing,
            "memory": memory,
            "wall_s": wall,
            "overhead_ratio": round(ratio, 3),
        }
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
