"""Attack step time of the red team's runner against a plain PyTorch fine-tuning loop.

Method
------
One red-team attack step is ``AdversaryRun.step`` (the runner TAR's inner loop also uses) on the next batch of
:class:`~tar_lightning.evaluation.redteam.AttackBatches` (seeded shuffling, collation from a ``TokenPool``,
right padding): that is what every attack of a suite repeats thousands of times. The floor is the same update
written as a plain loop: a ``torch.optim.AdamW`` (same LR and weight decay), forward, ``F.cross_entropy`` on
the shifted logits, backward, step, ``zero_grad(set_to_none=True)``, on pre-built batches of the same shape
(so the floor does no data work at all).

Both variants train the same model object (same memory placement) on batches of identical shape; the
variants are interleaved in rounds (order alternating per round) so load from other processes hits both alike.
Every block starts with a fresh optimizer (a new ``AdversaryRun`` / a new AdamW) and its first
``--block-warmup`` steps are discarded. The ratio is ``median(runner step) / median(plain step)``; the median
of the per-round ratios is printed as a drift-robust check. 1 torch thread (fastest for small models on a
shared 2-core machine).

The lm-evaluation-harness comparison of the evaluation side is optional: it runs only when ``lm_eval`` is
installed, and is reported as skipped otherwise.

Usage::

    python benchmarks/redteam_throughput.py           # ~25 s on a shared 2-core CPU
    python benchmarks/redteam_throughput.py --quick   # ~10 s

The last line printed is ``attack_step_ratio=<x>`` (target <= 1.05).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tar_lightning import AdversaryConfig  # noqa: E402
from tar_lightning.adversaries import AdversaryRun  # noqa: E402
from tar_lightning.data import TokenPool  # noqa: E402
from tar_lightning.evaluation.redteam import AttackBatches  # noqa: E402
from tar_lightning.models import tiny_model  # noqa: E402

LR = 2e-5
WEIGHT_DECAY = 0.01
PAD_ID = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--examples", type=int, default=256, help="examples in the attack's token pool")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps-per-block", type=int, default=6)
    p.add_argument("--block-warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps_per_block = 3, 3
    return args


def build(args):
    model, _ = tiny_model(
        "llama",
        seed=0,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab_size,
    )
    model = model.float().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab_size, (args.examples, args.seq_len), generator=g)
    pool = TokenPool([{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids])
    return model, pool


def runner_block(model, pool, args, seed: int) -> list[float]:
    adversary = AdversaryConfig(name="bench", data="forget", lr=LR, weight_decay=WEIGHT_DECAY)
    batches = AttackBatches({"forget": pool}, args.batch_size, seed, PAD_ID)
    steps = args.block_warmup + args.steps_per_block
    times = []
    with AdversaryRun(model, adversary, lr=LR, steps=steps) as run:
        for k in range(steps):
            t0 = time.perf_counter()
            run.step(batches.next(run.stream_for_step(k)))
            times.append(time.perf_counter() - t0)
    return times[args.block_warmup :]


def plain_block(model, batches, args) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    times = []
    for k in range(args.block_warmup + args.steps_per_block):
        batch = batches[k % len(batches)]
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    del optimizer
    return times[args.block_warmup :]


def lm_eval_comparison() -> str:
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-eval comparison: skipped (lm_eval is not installed; pip install lm-eval to compare MCQ scoring)"
    return "lm-eval comparison: skipped (lm_eval is installed, but this benchmark only times attack steps)"


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, pool = build(args)
    fixed = [pool.collate(list(range(i * args.batch_size, (i + 1) * args.batch_size)), PAD_ID) for i in range(8)]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: llama {args.layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size} "
        f"({n_params / 1e6:.1f}M parameters); batch {args.batch_size}x{args.seq_len}; {args.threads} thread(s)"
    )
    runner_times, plain_times, round_ratios = [], [], []
    for r in range(args.rounds):
        order = ("runner", "plain") if r % 2 == 0 else ("plain", "runner")
        got = {}
        for variant in order:
            got[variant] = runner_block(model, pool, args, seed=r) if variant == "runner" else plain_block(
                model, fixed, args
            )
        runner_times += got["runner"]
        plain_times += got["plain"]
        round_ratios.append(statistics.median(got["runner"]) / statistics.median(got["plain"]))
        print(
            f"round {r + 1}/{args.rounds}: runner {statistics.median(got['runner']) * 1e3:.1f} ms/step, "
            f"plain {statistics.median(got['plain']) * 1e3:.1f} ms/step"
        )
    runner_ms, plain_ms = statistics.median(runner_times) * 1e3, statistics.median(plain_times) * 1e3
    ratio = runner_ms / plain_ms
    print(f"median step: runner (AdversaryRun + AttackBatches) {runner_ms:.1f} ms, plain PyTorch loop {plain_ms:.1f} ms")
    print(f"median of per-round ratios: {statistics.median(round_ratios):.3f}")
    print(lm_eval_comparison())
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"runner_ms": runner_ms, "plain_ms": plain_ms, "ratio": ratio, "round_ratios": round_ratios,
                 "args": vars(args)},
                fh,
                indent=1,
            )
    print(f"attack_step_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
