"""One five-minute GPU check of a TAR outer step: MFU, overhead against a plain-PyTorch floor, memory, FSDP2 hazards.

    python benchmarks/gpu_check.py --out gpu_check.json     # one CUDA device, ≤ 5 minutes (--budget-s)
    python benchmarks/gpu_check.py --tiny --out tiny.json   # CPU: tiny Llama, small shapes (the test suite runs it)

Model: a randomly initialised Llama-3.2-1B-shaped model built from a config, no weights (hidden 2048, 16 layers,
MLP 8192, 32 query / 8 key-value heads, vocabulary 128,256, untied head), fp32 master weights in ``bf16-mixed``.
Paper shapes: K=64 AdamW adversary steps, a max-entropy TR pass every 4th step, adversary batch 4, TR and retain
batch 8, sequence 256, representation retain term with the frozen reference model. ``--tiny``: a tiny Llama and
small shapes on CPU (gloo for the one-rank FSDP2 phases).

Phases, in this order, each a fresh model, 1 warm-up + ``--steps`` (≥ 2) timed outer steps (CUDA events; on CPU
``time.perf_counter`` behind the same interface):

- ``calibration``: a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, bytes read + written);
- ``finetune``: plain fine-tuning, K fwd/bwd/AdamW steps on the adversary batch (one "outer step");
- ``floor``: the TAR outer step in plain PyTorch, no Lightning and no library code (snapshot, K adversary steps
  with a fresh AdamW, TR passes into a gradient buffer, restore, retain CE + representation distance to a frozen
  reference, clip, outer AdamW);
- ``tar_single``: :class:`~tar_lightning.TARModule` in a Lightning ``Trainer`` on one device;
- ``tar_fsdp2``: the same under :class:`~tar_lightning.strategy.FSDP2Strategy` with one rank (nccl / gloo);
- ``tar_fsdp2_cpu_snapshot``: the same with ``snapshot_device: cpu``;
- ``tar_fsdp2_checkpointing``: the same with activation checkpointing;
- ``checks``: under FSDP2, logits after snapshot → AdamW attack → restore equal the logits before the attack
  (bit for bit, and the attack did change them), and a validation pass followed by a training step runs;
- ``profile``: one ``torch.profiler`` step of the FSDP2 run (after a warm-up), split into adversary fwd/bwd,
  adversary optimizer, TR, retain + reference, snapshot/restore, clip + outer step and gaps (``record_function``
  ranges put around the library's pieces from outside, no change to the library; the device is synchronised at
  each range edge, so each range's wall time includes its device work), and the device-busy share of the step
  (union of kernel/copy intervals / step time; CPU: null).

Time budget (``--budget-s``, 270 s from the start by default): before each phase its time is estimated from what
ran already; a phase that would end past the budget is skipped and recorded as ``{"status": "skipped", ...}``. The JSON is
rewritten atomically after every phase (a timeout keeps what was measured) and a table is printed at the end.

Per phase: seconds per outer step, tokens/s (token-passes through forward+backward), model TFLOP/s, MFU against
the datasheet bf16 peak (A100 312, H100/H200 989 TFLOP/s) and against the calibrated matmul rate, peak memory
(CUDA allocated / reserved; CPU: null, plus the process's peak RSS), bytes per parameter. Model FLOPs per token:
6·N_m + 12·layers·hidden·seq for forward+backward, a third of that for the reference forward (N_m = parameters
minus the input embedding). Ratios: TARModule / floor, FSDP2 / single device, CPU snapshot / FSDP2, activation
checkpointing time and memory / FSDP2. Projection: the paper run (Llama-3-8B, 8 GPUs, 750 outer steps, the same
per-GPU batches) at the TFLOP/s per GPU of the FSDP2 phase, with the arithmetic written out (communication
between the 8 ranks is not in the one-rank measurement: a lower bound on the time).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

STARTED = time.monotonic()  # the budget counts from here (the imports of torch included)

#: dense bf16 tensor-core peak per device, FLOP/s (vendor data sheets, SXM parts)
BF16_PEAK = {"A100": 312e12, "H100": 989e12, "H200": 989e12}

PHASES = ("calibration", "finetune", "floor", "tar_single", "tar_fsdp2", "tar_fsdp2_cpu_snapshot",
          "tar_fsdp2_checkpointing", "checks", "profile")
#: the fields every measured outer-step phase reports
STEP_FIELDS = ("status", "seconds_per_outer_step", "outer_step_seconds", "tokens_per_s", "model_flops_per_outer_step",
               "tflops", "mfu_datasheet", "mfu_calibrated", "peak_allocated_gib", "peak_reserved_gib",
               "peak_rss_gib", "peak_bytes_per_parameter", "phase_seconds")
#: the profile's parts of an outer step (seconds)
PROFILE_PARTS = ("adversary_fwd_bwd", "adversary_optimizer", "tr", "retain_reference", "snapshot_restore",
                 "clip_outer_step", "gaps")
#: the paper run the projection is for: Llama-3-8B on 8 GPUs, 750 outer steps
PAPER = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, gpus=8, steps=750)
#: Llama-3.2-1B-shaped model, paper batch shapes (per GPU), calibration sizes
FULL_SHAPE = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, seq=256,
                  inner_steps=64, tr_every=4, adv_batch=4, batch=8, matmul=8192, copy_mib=1024)
#: ``--tiny``: the tiny Llama (the tiny tokenizer's vocabulary) and small shapes
TINY_SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=None, seq=32,
                  inner_steps=4, tr_every=2, adv_batch=2, batch=2, matmul=256, copy_mib=4)
ADV_LR = OUTER_LR = 2e-5


def bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name (``NVIDIA H200`` -> 989e12), None when unknown."""
    for key, peak in BF16_PEAK.items():
        if key in device_name.upper():
            return peak
    return None


def llama_matmul_parameters(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                            vocab: int) -> int:
    """Parameters of an untied Llama minus its input embedding (what the 6·N FLOP count multiplies)."""
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    layer = attn + 3 * hidden * intermediate + 2 * hidden
    return layers * layer + hidden + vocab * hidden


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU: tiny Llama and small shapes (the test suite runs it)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON result, rewritten after every phase")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip phases that would end after this many seconds from the start (default 270)")
    p.add_argument("--steps", type=int, default=2, help="timed outer steps per phase (after 1 warm-up), >= 2")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps {args.steps}: expected at least 2 timed outer steps")
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error(f"--phases: unknown {unknown}; expected names from {list(PHASES)}")
    args.shape = dict(TINY_SHAPE if args.tiny else FULL_SHAPE)
    return args


# -- timing and memory --------------------------------------------------------------------------------------


class StepTimer:
    """Outer-step times: CUDA events on a GPU, ``time.perf_counter`` on CPU; ``seconds()`` after the last step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.marks.append((self._start, end))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def reset_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory(cuda: bool, n_params: int) -> dict[str, Any]:
    """Peak memory since :func:`reset_memory` (CUDA) and the process's peak RSS (Linux: KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    if not cuda:
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "peak_rss_gib": rss,
                "peak_bytes_per_parameter": None}
    alloc = torch.cuda.max_memory_allocated()
    return {"peak_allocated_gib": alloc / 2**30, "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "peak_rss_gib": rss, "peak_bytes_per_parameter": alloc / n_params}


# -- model and data -----------------------------------------------------------------------------------------


def build_model(shape: dict, device: torch.device):
    """The benchmark Llama (fp32 master weights, random, identically initialised on every call) and tokenizer."""
    from tar_lightning.models import tiny_model

    overrides = dict(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                     num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                     num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(512, shape["seq"]),
                     tie_word_embeddings=False)
    if shape["vocab"]:
        overrides["vocab_size"] = shape["vocab"]
    with torch.device(device):
        model, tok = tiny_model("llama", seed=0, **overrides)
    return model.float().train(), tok


def make_batches(vocab: int, shape: dict, n: int) -> list[dict]:
    """``n`` outer-step bundles of random tokens: ``forget`` [K, adv_batch, L], ``tr`` and ``retain`` [1, batch, L]."""
    g = torch.Generator().manual_seed(0)
    sizes = {"forget": (shape["inner_steps"], shape["adv_batch"]), "tr": (1, shape["batch"]),
             "retain": (1, shape["batch"])}
    out = []
    for _ in range(n):
        bundle = {}
        for name, (k, b) in sizes.items():
            ids = torch.randint(3, vocab, (k, b, shape["seq"]), generator=g)
            bundle[name] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        out.append(bundle)
    return out


def micro(bundle: dict, stream: str, i: int, device: torch.device) -> dict:
    return {k: v[i].to(device, non_blocking=True) for k, v in bundle[stream].items()}


def tr_points(shape: dict) -> list[int]:
    return [k for k in range(shape["inner_steps"]) if (k + 1) % shape["tr_every"] == 0]


def flops(n_m: int, shape: dict, *, tar: bool) -> tuple[int, int]:
    """``(token-passes through forward+backward, model FLOPs)`` of one outer step."""
    seq, per_token = shape["seq"], 6 * n_m + 12 * shape["layers"] * shape["hidden"] * shape["seq"]
    passes = shape["inner_steps"] * shape["adv_batch"] * seq
    if not tar:
        return passes, per_token * passes
    passes += (len(tr_points(shape)) + 1) * shape["batch"] * seq  # TR passes and the retain pass
    return passes, per_token * passes + per_token // 3 * shape["batch"] * seq  # + the reference forward


# -- the plain-PyTorch phases --------------------------------------------------------------------------------


def lm_ce(model, mb: dict) -> torch.Tensor:
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten())


def floor_outer_step(model, reference, params, outer_opt, bundle, shape: dict, weights: dict[int, float],
                     device: torch.device) -> None:
    """One TAR outer step in plain PyTorch: the passes TARModule makes, written out (first order, one trajectory)."""
    dev = device.type
    with torch.no_grad():
        snapshot = [p.detach().clone() for p in params]
    buffer: list = [None] * len(params)
    inner = torch.optim.AdamW(params, lr=ADV_LR)
    tr_mb = micro(bundle, "tr", 0, device)
    for k in range(shape["inner_steps"]):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = lm_ce(model, micro(bundle, "forget", k, device))
        loss.backward()
        inner.step()
        inner.zero_grad(set_to_none=True)
        if k in weights:
            for p, g in zip(params, buffer, strict=True):
                p.grad = g
            with torch.autocast(dev, dtype=torch.bfloat16):
                logits = model(input_ids=tr_mb["input_ids"], attention_mask=tr_mb["attention_mask"],
                               use_cache=False).logits.float()
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            mask = tr_mb["attention_mask"].float()
            (-(entropy * mask).sum() / mask.sum() * weights[k]).backward()
            for i, p in enumerate(params):
                buffer[i], p.grad = p.grad, None
    del inner
    with torch.no_grad():
        for p, s in zip(params, snapshot, strict=True):
            p.copy_(s)
    del snapshot
    for p, g in zip(params, buffer, strict=True):
        p.grad = g
    mb = micro(bundle, "retain", 0, device)
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], output_hidden_states=True,
                    use_cache=False)
        with torch.no_grad():
            ref = reference(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                            output_hidden_states=True, use_cache=False).hidden_states
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten())
    dist = torch.stack([(h.float() - r.float()).norm(dim=-1).mean() for h, r in zip(out.hidden_states, ref,
                                                                                     strict=True)]).mean()
    (ce + dist).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    outer_opt.step()
    outer_opt.zero_grad(set_to_none=True)


def run_plain(kind: str, ctx: dict) -> dict:
    """``finetune`` or ``floor``: 1 warm-up + ``steps`` timed outer steps without Lightning."""
    shape, device, cuda = ctx["shape"], ctx["device"], ctx["cuda"]
    reset_memory(cuda)
    model, _ = build_model(shape, device)
    params = [p for p in model.parameters() if p.requires_grad]
    outer = torch.optim.AdamW(params, lr=OUTER_LR)
    weights = dict(zip(tr_points(shape), ctx["tr_weights"], strict=True))
    reference = None
    if kind == "floor":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    timer = StepTimer(cuda)
    bundles = make_batches(ctx["vocab"], shape, 1 + ctx["steps"])
    for i, bundle in enumerate(bundles):
        if i:
            timer.start()
        if kind == "floor":
            floor_outer_step(model, reference, params, outer, bundle, shape, weights, device)
        else:
            for k in range(shape["inner_steps"]):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = lm_ce(model, micro(bundle, "forget", k, device))
                loss.backward()
                outer.step()
                outer.zero_grad(set_to_none=True)
        if i:
            timer.stop()
    times = timer.seconds()
    result = step_metrics(ctx, times, tar=kind == "floor")
    del model, reference, outer, params
    return result


def step_metrics(ctx: dict, times: list[float], *, tar: bool) -> dict:
    passes, fl = flops(ctx["n_matmul"], ctx["shape"], tar=tar)
    seconds = sum(times) / len(times)
    rate = fl / seconds
    calibrated = ctx["result"]["phases"].get("calibration", {}).get("matmul_tflops")
    return {
        "status": "ok",
        "seconds_per_outer_step": seconds,
        "outer_step_seconds": times,
        "token_passes_per_outer_step": passes,
        "tokens_per_s": passes / seconds,
        "model_flops_per_outer_step": fl,
        "tflops": rate / 1e12,
        "mfu_datasheet": None if ctx["peak"] is None else rate / ctx["peak"],
        "mfu_calibrated": None if not calibrated else rate / (calibrated * 1e12),
        **memory(ctx["cuda"], ctx["n_params"]),
    }


def run_calibration(ctx: dict) -> dict:
    """bf16 matmul TFLOP/s (n×n @ n×n, 10 per step) and device-to-device copy GB/s (bytes read + written)."""
    device, cuda, n = ctx["device"], ctx["cuda"], ctx["shape"]["matmul"]
    reset_memory(cuda)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    src = torch.empty(ctx["shape"]["copy_mib"] * 2**20 // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    mm, cp = StepTimer(cuda), StepTimer(cuda)
    for i in range(1 + ctx["steps"]):
        if i:
            mm.start()
        for _ in range(10):
            torch.mm(a, b)
        if i:
            mm.stop()
            cp.start()
        for _ in range(10):
            dst.copy_(src)
        if i:
            cp.stop()
    mm_s, cp_s = mm.seconds(), cp.seconds()
    mm_rate = 10 * 2 * n**3 / (sum(mm_s) / len(mm_s))
    copy_rate = 10 * 2 * src.numel() * 4 / (sum(cp_s) / len(cp_s))
    del a, b, src, dst
    return {"status": "ok", "matmul_n": n, "matmul_step_seconds": mm_s, "matmul_tflops": mm_rate / 1e12,
            "matmul_fraction_of_datasheet": None if ctx["peak"] is None else mm_rate / ctx["peak"],
            "copy_bytes": ctx["shape"]["copy_mib"] * 2**20, "copy_step_seconds": cp_s, "copy_gb_s": copy_rate / 1e9}


# -- the Lightning phases -----------------------------------------------------------------------------------


def tar_module(ctx: dict, *, snapshot_device: Optional[str] = None, checkpointing: bool = False):
    from tar_lightning import AdversaryConfig, TARConfig, TARModule

    shape = ctx["shape"]
    model, tok = build_model(shape, ctx["device"])
    cfg = TARConfig(
        inner_steps=shape["inner_steps"], tr_every=shape["tr_every"], trajectories=1, tr_loss="max_entropy",
        retain_representation=True, clip_grad_norm=1.0, seed=0, snapshot_device=snapshot_device,
        adversaries=[AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=ADV_LR)],
    )
    return TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=OUTER_LR), tokenizer=tok,
                     sharding={"activation_checkpointing": checkpointing})


def trainer(ctx: dict, *, fsdp2: bool, callbacks: list, max_steps: int, **kw):
    import lightning as L

    from tar_lightning.strategy import FSDP2Strategy

    if fsdp2 and "MASTER_PORT" not in os.environ:  # a process group of one process: any free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    strategy = (FSDP2Strategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=True)
                if fsdp2 else "auto")
    return L.Trainer(accelerator="cuda" if ctx["cuda"] else "cpu", devices=1, precision="bf16-mixed",
                     strategy=strategy, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     use_distributed_sampler=False, log_every_n_steps=10**6, **kw)


def loader(batches: list):
    return torch.utils.data.DataLoader(batches, batch_size=None)


def run_tar(ctx: dict, *, fsdp2: bool, snapshot_device: Optional[str] = None, checkpointing: bool = False) -> dict:
    """TARModule in a Trainer: 1 warm-up + ``steps`` timed outer steps."""
    import lightning as L

    cuda = ctx["cuda"]

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.timer = StepTimer(cuda)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:
                self.timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx:
                self.timer.stop()

    reset_memory(cuda)
    module = tar_module(ctx, snapshot_device=snapshot_device, checkpointing=checkpointing)
    cb = Timer()
    n = 1 + ctx["steps"]
    t = trainer(ctx, fsdp2=fsdp2, callbacks=[cb], max_steps=n)
    forward_dtypes: set[str] = set()  # a projection weight as the forward sees it (FSDP2: after the all-gather)
    module.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, inputs: forward_dtypes.add(str(mod.weight.dtype).removeprefix("torch.")))
    t.fit(module, loader(make_batches(ctx["vocab"], ctx["shape"], n)))
    result = step_metrics(ctx, cb.timer.seconds(), tar=True)
    result.update(
        global_step=t.global_step, sharded=type(module.model).__name__.startswith("FSDP"),
        param_dtypes_in_forward=sorted(forward_dtypes),
        master_param_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in module.trainable_parameters()}),
    )
    del module, t
    return result


class _Ranges:
    """``record_function`` ranges opened and closed at the library's seams, the device synchronised at each edge."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.open: dict[str, tuple[Any, float]] = {}
        self.seconds: dict[str, float] = {}
        self.active = False  # only the profiled step is split into ranges

    def enter(self, name: str) -> None:
        if not self.active:
            return
        sync(self.cuda)
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        self.open[name] = (rf, time.perf_counter())

    def exit(self, name: str) -> None:
        if name in self.open:
            rf, t0 = self.open.pop(name)
            sync(self.cuda)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            rf.__exit__(None, None, None)


def run_profile(ctx: dict) -> dict:
    """One profiled FSDP2 outer step (after a warm-up), split into its parts (see the module docstring)."""
    import lightning as L
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    import tar_lightning.grad_sync as gs
    import tar_lightning.tar_module as tm
    from tar_lightning.adversaries.runner import AdversaryRun

    cuda = ctx["cuda"]
    ranges = _Ranges(cuda)
    module = tar_module(ctx)
    state = {"inner": False, "outer_opt": None}

    class Snapshot(tm.ParameterSnapshot):
        def __init__(self, *a, **k):
            ranges.enter("snapshot")
            super().__init__(*a, **k)
            ranges.exit("snapshot")
            state["inner"] = True

        def restore(self):
            ranges.enter("restore")
            super().restore()
            ranges.exit("restore")
            state["inner"] = False

    class Buffer(tm.GradientBuffer):
        def swap_in(self):
            if state["inner"]:
                ranges.enter("tr")
            super().swap_in()

        def swap_out(self):
            super().swap_out()
            ranges.exit("tr")

    def retain_objective(batch, _orig=module.retain_objective):
        ranges.enter("retain_reference")
        return _orig(batch)

    def clip_start(fn):
        def wrapped(*a, **k):
            if "retain_reference" in ranges.open:
                ranges.exit("retain_reference")
                ranges.enter("clip")
            return fn(*a, **k)
        return wrapped

    def adversary_step(self, batch, _orig=AdversaryRun.step):
        ranges.enter("adversary_step")
        try:
            return _orig(self, batch)
        finally:
            ranges.exit("adversary_step")

    def pre(opt, args, kwargs):
        if opt is state["outer_opt"]:
            ranges.exit("clip")
            ranges.enter("outer_optimizer")
        else:
            ranges.enter("adversary_optimizer")

    def post(opt, args, kwargs):
        ranges.exit("outer_optimizer" if opt is state["outer_opt"] else "adversary_optimizer")

    class Profile(L.Callback):
        prof: Any = None
        wall: float = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                state["outer_opt"] = trainer.optimizers[0]
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                sync(cuda)
                self.prof.__enter__()
                ranges.active = True
                ranges.enter("outer_step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                ranges.exit("outer_step")
                ranges.active = False
                self.prof.__exit__(None, None, None)

    saved = (tm.ParameterSnapshot, tm.GradientBuffer, gs.global_norm, torch.nn.utils.get_total_norm, AdversaryRun.step)
    tm.ParameterSnapshot, tm.GradientBuffer = Snapshot, Buffer
    gs.global_norm, torch.nn.utils.get_total_norm = clip_start(saved[2]), clip_start(saved[3])
    AdversaryRun.step = adversary_step
    module.retain_objective = retain_objective
    hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    cb = Profile()
    try:
        t = trainer(ctx, fsdp2=True, callbacks=[cb], max_steps=2)
        t.fit(module, loader(make_batches(ctx["vocab"], ctx["shape"], 2)))
    finally:
        tm.ParameterSnapshot, tm.GradientBuffer, gs.global_norm, torch.nn.utils.get_total_norm = saved[:4]
        AdversaryRun.step = saved[4]
        for h in hooks:
            h.remove()
    totals = dict(ranges.seconds)
    get = totals.get
    step = get("outer_step", 0.0)
    parts = {
        "adversary_fwd_bwd": get("adversary_step", 0.0) - get("adversary_optimizer", 0.0),
        "adversary_optimizer": get("adversary_optimizer", 0.0),
        "tr": get("tr", 0.0),
        "retain_reference": get("retain_reference", 0.0),
        "snapshot_restore": get("snapshot", 0.0) + get("restore", 0.0),
        "clip_outer_step": get("clip", 0.0) + get("outer_optimizer", 0.0),
    }
    parts["gaps"] = step - sum(parts.values())
    busy = None
    if cuda and step:  # kernels, copies and memsets on the device (not the user-annotation ranges), overlaps merged
        device = [(e.time_range.start, e.time_range.end) for e in cb.prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        busy = union_seconds(device) / 1e6 / step
    del module, t
    return {"status": "ok", "outer_step_seconds": step, "parts_seconds": parts,
            "parts_share": {k: (v / step if step else None) for k, v in parts.items()},
            "device_busy_share": busy, "ranges_seconds": totals,
            "note": "wall time between device synchronisations at every range edge (also record_function ranges in "
                    "the profile); gaps = step - sum of the parts"}


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def run_checks(ctx: dict) -> dict:
    """Under FSDP2: restore gives back the logits of before the attack; validation then a training step."""
    from tar_lightning.base_module import reshard_fsdp
    from tar_lightning.snapshot import ParameterSnapshot

    shape = ctx["shape"]
    module = tar_module(ctx)
    batches = make_batches(ctx["vocab"], shape, 2)
    val = [micro(batches[0], "retain", 0, torch.device("cpu"))]
    t = trainer(ctx, fsdp2=True, callbacks=[], max_steps=2, val_check_interval=1, num_sanity_val_steps=1,
                limit_val_batches=1)
    t.fit(module, loader(batches), torch.utils.data.DataLoader(val, batch_size=None))
    validation_then_step = t.global_step == 2

    device = t.strategy.root_device
    mb = micro(batches[0], "tr", 0, device)
    params = module.trainable_parameters()

    def logits() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            out = module.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
        reshard_fsdp(module.model)
        return out.logits.float().cpu()

    before = logits()
    snap = ParameterSnapshot(params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for k in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_ce(module.model, micro(batches[0], "forget", k, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    attacked = logits()
    snap.restore()
    after = logits()
    return {"status": "ok", "validation_then_training_step": validation_then_step,
            "attack_changed_logits": not torch.equal(before, attacked),
            "restore_logits_equal": torch.equal(before, after),
            "restore_max_abs_diff": float((before - after).abs().max())}


# -- ratios, projection, output -----------------------------------------------------------------------------


def ratios(phases: dict) -> dict:
    def sec(name):
        p = phases.get(name, {})
        return p.get("seconds_per_outer_step") if p.get("status") == "ok" else None

    def mem(name):
        p = phases.get(name, {})
        return p.get("peak_allocated_gib") if p.get("status") == "ok" else None

    def div(a, b):
        return None if a is None or not b else a / b

    return {
        "tar_single_over_floor": div(sec("tar_single"), sec("floor")),
        "floor_over_finetune": div(sec("floor"), sec("finetune")),
        "fsdp2_over_single": div(sec("tar_fsdp2"), sec("tar_single")),
        "cpu_snapshot_over_fsdp2": div(sec("tar_fsdp2_cpu_snapshot"), sec("tar_fsdp2")),
        "checkpointing_time_over_fsdp2": div(sec("tar_fsdp2_checkpointing"), sec("tar_fsdp2")),
        "checkpointing_memory_over_fsdp2": div(mem("tar_fsdp2_checkpointing"), mem("tar_fsdp2")),
    }


def projection(result: dict) -> dict:
    """The paper run (8B, 8 GPUs, 750 steps, the paper's per-GPU shapes) at the per-GPU TFLOP/s of the measured
    FSDP2 phase (else the single-device one, else the floor)."""
    shape = FULL_SHAPE
    phases = result["phases"]
    source = next((n for n in ("tar_fsdp2", "tar_single", "floor")
                   if phases.get(n, {}).get("status") == "ok"), None)
    paper = dict(shape, hidden=PAPER["hidden"], layers=PAPER["layers"])
    n_m = llama_matmul_parameters(PAPER["hidden"], PAPER["intermediate"], PAPER["layers"], PAPER["heads"],
                                  PAPER["kv_heads"], PAPER["vocab"])
    passes, fl = flops(n_m, paper, tar=True)
    out: dict[str, Any] = {"model": "Llama-3-8B", "gpus": PAPER["gpus"], "outer_steps": PAPER["steps"],
                           "matmul_parameters": n_m, "flops_per_outer_step_per_gpu": fl,
                           "token_passes_per_outer_step_per_gpu": passes, "rate_from": source}
    if source is None:
        out.update(seconds_per_outer_step=None, hours=None, gpu_hours=None, arithmetic="no TAR phase measured")
        return out
    rate = phases[source]["tflops"] * 1e12
    seconds = fl / rate
    hours = seconds * PAPER["steps"] / 3600
    out.update(
        tflops_per_gpu=rate / 1e12, seconds_per_outer_step=seconds, hours=hours, gpu_hours=hours * PAPER["gpus"],
        arithmetic=(
            f"per GPU per outer step: (6·{n_m:.3e} + 12·{PAPER['layers']}·{PAPER['hidden']}·{shape['seq']}) FLOP/token"
            f" × {passes} token-passes + the reference forward = {fl:.3e} FLOP; / {rate / 1e12:.4g} TFLOP/s "
            f"({source}) = {seconds:.2f} s; × {PAPER['steps']} steps = {hours:.2f} h; × {PAPER['gpus']} GPUs = "
            f"{hours * PAPER['gpus']:.1f} GPU-hours (same per-GPU batches; communication between ranks not included)"
        ),
    )
    return out


def write_json(path: Path, result: dict) -> None:
    from tar_lightning.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1) + "\n", fsync=False, what="gpu check result")


def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    lines = ["| phase | status | s / outer step | tokens/s | TFLOP/s | MFU (sheet) | MFU (calibrated) | peak alloc GiB "
             "| peak reserved GiB | peak B/param | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in PHASES:
        p = result["phases"].get(name)
        if p is None:
            continue
        if p.get("status") != "ok" or "tokens_per_s" not in p:
            extra = f" ({p['reason']})" if p.get("reason") else ""
            lines.append(f"| {name} | {p.get('status')}{extra} | | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | ok | {fmt(p['seconds_per_outer_step'])} | {fmt(p['tokens_per_s'], '.4g')} | "
            f"{fmt(p['tflops'])} | {fmt(p['mfu_datasheet'])} | {fmt(p['mfu_calibrated'])} | "
            f"{fmt(p['peak_allocated_gib'])} | {fmt(p['peak_reserved_gib'])} | {fmt(p['peak_bytes_per_parameter'])} | "
            f"{fmt(p['peak_rss_gib'])} |")
    cal = result["phases"].get("calibration", {})
    if cal.get("status") == "ok":
        lines.append(f"\ncalibration: matmul {fmt(cal['matmul_tflops'])} TFLOP/s, copy {fmt(cal['copy_gb_s'])} GB/s")
    prof = result["phases"].get("profile", {})
    if prof.get("status") == "ok":
        lines.append("profile (s of one FSDP2 outer step): " + ", ".join(
            f"{k} {fmt(v)}" for k, v in prof["parts_seconds"].items()) + f"; device busy {fmt(prof['device_busy_share'])}")
    chk = result["phases"].get("checks", {})
    if chk.get("status") == "ok":
        lines.append(f"checks: restore_logits_equal={chk['restore_logits_equal']} (attack changed them: "
                     f"{chk['attack_changed_logits']}), validation_then_training_step={chk['validation_then_training_step']}")
    state = result["state_bytes_per_parameter_model"]
    lines.append("TAR state per parameter (model, before activations): " + " + ".join(
        f"{k} {v}" for k, v in state.items() if k != "total") + f" = {state['total']} bytes")
    lines.append("ratios: " + ", ".join(f"{k} {fmt(v)}" for k, v in result["ratios"].items()))
    lines.append("projection: " + result["projection"]["arithmetic"])
    return "\n".join(lines)


def estimate_seconds(name: str, ctx: dict) -> float:
    """How long phase ``name`` will take, from the phases measured so far (0 before any is measured)."""
    phases = ctx["result"]["phases"]

    def took(n):
        p = phases.get(n, {})
        return p.get("phase_seconds") if p.get("status") == "ok" else None

    if name == "calibration":
        return 0.0
    if name in ("finetune", "floor"):
        base = took("finetune")
        if base is None:
            return 0.0
        _, ft = flops(ctx["n_matmul"], ctx["shape"], tar=False)
        _, tar = flops(ctx["n_matmul"], ctx["shape"], tar=True)
        return base * (tar / ft if name == "floor" else 1.0)
    for n in ("tar_fsdp2", "tar_single", "floor"):
        base = took(n)
        if base is not None:
            # checks: 2 steps and a validation; profile: 2 steps, synchronised, plus the profiler's parsing
            factor = {"checks": 2 / (1 + ctx["steps"]), "profile": 1.5}.get(name, 1.0)
            return 1.2 * base * factor
    return 0.0


def main(argv=None, on_phase: Callable[[str, dict], None] | None = None) -> dict:
    """Runs the check; ``on_phase(name, result)`` is called after each phase's JSON is on disk."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("gpu_check: no CUDA device; run with --tiny for the CPU check")
    started = STARTED if __name__ == "__main__" else time.monotonic()
    device = torch.device("cuda" if cuda else "cpu")
    shape = dict(args.shape)
    probe, _ = build_model(shape, torch.device("meta"))
    vocab = probe.config.vocab_size
    shape["vocab"] = vocab
    n_params = sum(p.numel() for p in probe.parameters())
    n_matmul = n_params - probe.get_input_embeddings().weight.numel()
    del probe
    from tar_lightning import TARConfig

    tr_weights = TARConfig(inner_steps=shape["inner_steps"], tr_every=shape["tr_every"]).tr_weights()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = Path(args.out)
    result: dict[str, Any] = {
        "device": name, "tiny": args.tiny, "torch": torch.__version__, "budget_seconds": args.budget_s,
        "bf16_peak_tflops": None if bf16_peak(name) is None or not cuda else bf16_peak(name) / 1e12,
        "model": {"parameters": n_params, "matmul_parameters": n_matmul, "untied_head": True, **shape},
        "timed_steps_per_phase": args.steps, "warmup_steps_per_phase": 1,
        "state_bytes_per_parameter_model": {"fp32 weights": 4, "grads": 4, "outer AdamW": 8, "snapshot": 4,
                                            "TR buffer": 4, "adversary AdamW": 8, "reference (bf16 under FSDP2)": 2,
                                            "total": 34},
        "phases": {},
    }
    ctx = dict(shape=shape, device=device, cuda=cuda, steps=args.steps, vocab=vocab, n_params=n_params,
               n_matmul=n_matmul, tr_weights=tr_weights, peak=bf16_peak(name) if cuda else None, result=result)
    runners: dict[str, Callable[[], dict]] = {
        "calibration": lambda: run_calibration(ctx),
        "finetune": lambda: run_plain("finetune", ctx),
        "floor": lambda: run_plain("floor", ctx),
        "tar_single": lambda: run_tar(ctx, fsdp2=False),
        "tar_fsdp2": lambda: run_tar(ctx, fsdp2=True),
        "tar_fsdp2_cpu_snapshot": lambda: run_tar(ctx, fsdp2=True, snapshot_device="cpu"),
        "tar_fsdp2_checkpointing": lambda: run_tar(ctx, fsdp2=True, checkpointing=True),
        "profile": lambda: run_profile(ctx),
        "checks": lambda: run_checks(ctx),
    }
    for phase in PHASES:
        if phase not in args.phases:
            result["phases"][phase] = {"status": "not_selected"}
            continue
        elapsed = time.monotonic() - started
        need = estimate_seconds(phase, ctx)
        if elapsed + need > args.budget_s:
            result["phases"][phase] = {"status": "skipped", "reason": f"over budget: {elapsed:.0f} s elapsed + "
                                       f"{need:.0f} s estimated > {args.budget_s:g} s"}
        else:
            t0 = time.monotonic()
            try:
                result["phases"][phase] = runners[phase]()
            except Exception as exc:  # recorded and the run goes on: a crash is one of the things checked for
                result["phases"][phase] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000]}
            result["phases"][phase]["phase_seconds"] = time.monotonic() - t0
            reset_memory(cuda)  # what is still allocated now leaked from the phase
            result["phases"][phase]["allocated_gib_after_phase"] = (
                torch.cuda.memory_allocated() / 2**30 if cuda else None)
        result["ratios"] = ratios(result["phases"])
        result["projection"] = projection(result)
        result["elapsed_seconds"] = time.monotonic() - started
        write_json(out, result)
        if on_phase is not None:
            on_phase(phase, result)
    write_json(out, result)  # with the phases not selected after the last one run
    print(table(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
