"""Peak host memory and time of red-team attack steps, whole batch vs micro-batched, against a plain-PyTorch floor.

Method
------
Each variant runs in its own subprocess, one after another (never side by side), in this order: load the model
(fp32, train mode), build one batch of ``--batch-size`` × ``--seq-len`` random tokens (every position labelled),
``gc``, reset the peak resident set (``VmHWM``, through ``/proc/self/clear_refs``), then ``--steps``
full-parameter AdamW attack steps (lr 1e-5, the optimizer state is allocated in the first). Reported: the peak
resident set during the steps minus the resident set right before them (``growth``), and the median step time.

* ``floor``: the step in plain PyTorch: forward, ``F.cross_entropy`` of the shifted logits, backward,
  ``torch.optim.AdamW.step``, ``zero_grad``.
* ``whole``: :class:`tar_lightning.adversaries.AdversaryRun` ``.step`` on the whole batch (what the red team ran
  before ``micro_batch_size``).
* ``micro``: the same with ``micro_batch_size=--micro`` (``tar-lightning redteam --micro_batch_size``).

The growth holds the gradients and AdamW's two moments (3 fp32 copies of the parameters, the same in every
variant) plus the activations and logits of one pass, which micro-batching shrinks. RSS also counts heap pages
glibc keeps after ``free``; the workers set ``MALLOC_MMAP_THRESHOLD_=65536`` unless the environment sets it.

Usage::

    python benchmarks/attack_memory.py                          # SmolLM2-135M, batch 32 x 128, micro 8
    python benchmarks/attack_memory.py --model tiny --batch-size 8 --micro 2   # seconds, for a smoke run
    python benchmarks/attack_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20
VARIANTS = ("floor", "whole", "micro")


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from tar_step_overhead import reset_peak_rss, rss_status

    from tar_lightning.adversaries import AdversaryConfig, AdversaryRun
    from tar_lightning.models import load_model, tiny_llama

    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        model, tok = tiny_llama()
    else:
        model, tok = load_model(args.model, dtype="float32")
    model = model.float().train()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    adv = AdversaryConfig(name="bench", lr=1e-5, weight_decay=0.0)

    if args.worker == "floor":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

        def step() -> None:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        run = AdversaryRun(model, adv, lr=1e-5, steps=args.steps,
                           micro_batch_size=args.micro if args.worker == "micro" else None)

        def step() -> None:
            run.step(batch)

    gc.collect()
    was_reset = reset_peak_rss()
    before = rss_status()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    after = rss_status()
    return {"variant": args.worker, "growth": after["VmHWM"] - before["VmRSS"], "base": before["VmRSS"],
            "peak_reset": was_reset, "step_s": statistics.median(times), "times_s": times, "n_params": n_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model source, or 'tiny'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro", type=int, default=8, help="micro_batch_size of the 'micro' variant")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]))
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size), "--seq-len",
               str(args.seq_len), "--micro", str(args.micro), "--steps", str(args.steps), "--threads",
               str(args.threads), "--worker", variant]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"worker {variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        if not results[variant]["peak_reset"]:
            sys.exit(f"worker {variant}: /proc/self/clear_refs could not reset the peak; its growth would include "
                     "the model load (Linux >= 4.0 needed)")
    floor = results["floor"]
    print(f"model {args.model} ({floor['n_params'] / 1e6:.1f} M parameters), batch {args.batch_size} x "
          f"{args.seq_len}, micro-batch {args.micro}, {args.steps} AdamW steps, {args.threads} thread(s)")
    print(f"{'variant':<8} {'peak growth':>12} {'/ floor':>8} {'step':>9} {'/ floor':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['growth'] / MIB:>9.0f} MiB {r['growth'] / floor['growth']:>8.2f} "
              f"{r['step_s']:>8.2f}s {r['step_s'] / floor['step_s']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
