"""Peak host memory (RSS) per rank while ``TARModule`` starts under FSDP2, against a plain-PyTorch floor.

Method
------
Two ranks (``--devices``) on the CPU with gloo, Lightning's ``ModelParallelStrategy`` (FSDP2,
``data_parallel_size=N``, ``tensor_parallel_size=1``). Each rank, in this order:

1. imports everything, then reads its resident set (``VmRSS``): ``base``;
2. *floor*: loads the model once with :func:`tar_lightning.models.load_model` (fp32) and reads its resident set
   (``VmRSS``) with the model held in ordinary memory: what holding the model once costs in plain
   PyTorch/transformers, in the same process. (transformers maps a weights file already in the loaded dtype, as
   the fp32 SmolLM2 cache is, lazily into memory as shared page cache; a file of another dtype, as Llama-3-8B's
   bf16 loaded in fp32, is converted into ordinary memory. Each weight is copied once after loading so that the
   model is held as in the second case.) ``VmHWM`` is reset (``/proc/self/clear_refs``) here;
3. *start-up*: builds ``TARModule(model=<that loaded model>, retain_representation=True)`` (the reference model
   is a copy of the policy as given, or with ``--reference source`` the model source loaded again, as the paper
   recipe's separate ``reference_model``) and runs ``Trainer.fit`` with ``max_steps=0``:
   everything a run does before its first step (``configure_model`` shards the policy and builds the reference
   model, ``on_fit_start``), and reads the peak resident set of that phase (``VmHWM`` reset after step 2).

Reported per rank: ``floor`` and ``startup`` peaks, their ratio, and the growth over the resident set after the
load, in units of the model's fp32 size (``params × 4`` bytes): about 1 when each rank holds a second full copy
(a deep-copied reference), about 1/N (its shards) when it does not. ``ru_maxrss`` is not used: it is a lifetime
peak that holds import-time spikes and the launcher's own peak. RSS also counts heap pages glibc keeps after
``free``; the worker sets ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are then unmapped when freed) unless the
environment sets it.

``--compare-src DIR`` runs the same measurement a second time with ``PYTHONPATH=DIR`` (another checkout's ``src``,
e.g. ``git worktree add /tmp/base HEAD``) and prints both.

Usage::

    python benchmarks/startup_memory.py                               # SmolLM2-135M, 2 ranks, fp32
    python benchmarks/startup_memory.py --precision bf16-mixed        # reference in bf16 (FSDP2 param dtype)
    python benchmarks/startup_memory.py --compare-src /tmp/base/src   # before/after
    python benchmarks/startup_memory.py --model tiny-llama --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from tar_lightning import AdversaryConfig, TARConfig, TARModule
    from tar_lightning.models import load_model

    torch.set_num_threads(1)
    base = _status("VmRSS")
    _reset_peak()
    model, tok = load_model(args.model)
    # transformers maps a weights file of the loaded dtype (the SmolLM2 cache is fp32) into memory lazily; a file
    # of another dtype (Llama-3-8B's bf16 loaded as fp32) is converted into ordinary (anonymous) memory. Copy
    # every weight once so that the model is held as it would be then: resident, and not shared page cache.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    gc.collect()
    floor = loaded = _status("VmRSS")
    model_bytes = sum(p.numel() for p in model.parameters()) * 4
    _reset_peak()

    cfg = TARConfig(inner_steps=1, tr_every=1, retain_representation=True, adversaries=[AdversaryConfig(lr=1e-5)])
    reference = args.model if args.reference == "source" else None
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=1e-5), tokenizer=tok,
                       reference_model=reference)
    del model
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, precision=args.precision, max_steps=0, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([0]))
    startup = _status("VmHWM")
    ref = module.reference_model
    ref_param = next(ref.parameters()) if ref is not None else None
    result = {
        "rank": trainer.global_rank,
        "reference_kind": args.reference,
        "base": base,
        "floor": floor,
        "loaded": loaded,
        "startup": startup,
        "model_bytes": model_bytes,
        "reference": None if ref_param is None else {"type": type(ref_param).__name__,
                                                        "dtype": str(ref_param.dtype)},
    }
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: str, devices: int, precision: str, reference: str, src: str | None) -> list[dict]:
    """Run the worker on ``devices`` ranks (with ``PYTHONPATH=src`` when given); one result per rank."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED"):
            env.pop(key, None)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--devices", str(devices),
               "--precision", precision, "--reference", reference, "--out", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(devices)]


def _rows(label: str, results: list[dict]) -> list[str]:
    rows = []
    for r in results:
        growth = (r["startup"] - r["loaded"]) / r["model_bytes"]
        rows.append(
            f"| {label} | {r['rank']} | {r['base'] / MIB:.0f} | {r['floor'] / MIB:.0f} | {r['startup'] / MIB:.0f} "
            f"| {r['startup'] / r['floor']:.2f} | {growth:.2f} | {r['reference'] and r['reference']['type']} "
            f"{r['reference'] and r['reference']['dtype']} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model source (default: SmolLM2-135M)")
    ap.add_argument("--devices", type=int, default=2, help="ranks (gloo processes)")
    ap.add_argument("--precision", default="32-true", help="Trainer precision (32-true, bf16-mixed, bf16-true)")
    ap.add_argument("--reference", choices=["copy", "source"], default="copy",
                    help="reference model: a copy of the policy as given (default), or the model source loaded again "
                         "(the paper recipe's separate reference_model)")
    ap.add_argument("--compare-src", default=None, help="also measure with PYTHONPATH=this (another checkout's src)")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    # Convert/cache the model once outside the measured processes (both ranks would otherwise wait on the lock).
    subprocess.run([sys.executable, "-c", f"from tar_lightning.models import load_model; load_model({args.model!r})"],
                   check=True, capture_output=True)
    runs = {}
    if args.compare_src:
        runs["compared"] = measure(args.model, args.devices, args.precision, args.reference, args.compare_src)
    runs["this"] = measure(args.model, args.devices, args.precision, args.reference, None)
    model_mib = runs["this"][0]["model_bytes"] / MIB
    print(f"{args.model}, {args.devices} ranks (gloo, FSDP2, CPU), precision {args.precision}, reference "
          f"{args.reference}; "
          f"fp32 model size {model_mib:.0f} MiB")
    print("| code | rank | RSS after imports (MiB) | floor: model loaded once (MiB) | start-up peak (MiB) "
          "| start-up / floor | growth after load (× model) | reference parameters |")
    print("|---|---|---|---|---|---|---|---|")
    for label, results in runs.items():
        for row in _rows(label, results):
            print(row)
    for label, results in runs.items():
        print(f"{label}: max start-up/floor = {max(r['startup'] / r['floor'] for r in results):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
