"""GPU check of the sharded TAR path: outer steps in bf16 under FSDP2 on one device (≤ 5 minutes on one GPU).

    python benchmarks/gpu_check.py                 # ~0.85 B Llama built from a config (no download), CUDA
    python benchmarks/gpu_check.py --tiny          # CPU smoke test (the test suite runs it): tiny Llama, gloo

What runs: Lightning ``Trainer(strategy=ModelParallelStrategy(1, 1), precision="bf16-mixed")`` with
:class:`~tar_lightning.TARModule` (``fully_shard`` per decoder layer and root; FSDP2 mixed-precision policy bf16
params / fp32 reduce; fp32 master weights, snapshot, TR buffer and optimizer states), ``--warmup`` untimed outer
steps, then ``--steps`` timed ones. Reported (one JSON object on stdout, also written to ``--out``):

- ``tokens_per_s``: token-passes (forward+backward) per second over the timed outer steps;
- ``mfu``: model FLOPs (6·N_m per token per forward+backward, N_m = parameters minus the input embedding, plus
  2·N_m per token of the frozen reference forward) / time / the chip's dense bf16 peak (A100 312, H100 and H200
  989 TFLOP/s, by device name; ``null`` when unknown or on CPU);
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` (CPU: ``null``);
- ``param_dtypes_in_forward`` / ``master_param_dtypes``: what a projection's weight is inside forward (bf16 under
  the policy) and what the optimizers update (fp32);
- ``restore_bit_exact``: after training, a snapshot of the FSDP2 shards, one adversary-style SGD step through
  the sharded model, restore: every shard equal bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch

#: dense bf16 tensor-core peak per device, FLOP/s (vendor data sheets, SXM parts)
BF16_PEAK = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name (``NVIDIA H200`` -> 989e12), None when unknown."""
    for key, peak in BF16_PEAK.items():
        if key in device_name.upper():
            return peak
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, gloo, a few small steps")
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--intermediate-size", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch of every stream")
    p.add_argument("--inner-steps", type=int, default=16, help="K adversary steps per outer step")
    p.add_argument("--tr-every", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="untimed outer steps (allocator, kernels)")
    p.add_argument("--steps", type=int, default=3, help="timed outer steps")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden_size, args.intermediate_size, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.vocab_size, args.seq_len, args.batch_size, args.inner_steps, args.tr_every = 0, 32, 2, 2, 1
        args.warmup, args.steps = 1, 1
    return args


def random_batches(vocab: int, steps: dict[str, int], n: int, batch: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        bundle = {}
        for name, k in steps.items():
            ids = torch.randint(3, vocab, (k, batch, length), generator=g)
            bundle[name] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        out.append(bundle)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tar_lightning import AdversaryConfig, TARConfig, TARModule
    from tar_lightning.models import tiny_model
    from tar_lightning.snapshot import ParameterSnapshot, local_tensor

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("gpu_check: no CUDA device; run with --tiny for the CPU smoke test")
    if "MASTER_PORT" not in os.environ:  # one process: any free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    overrides = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=args.kv_heads, max_position_embeddings=max(512, args.seq_len))
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    with torch.device("cuda" if cuda else "cpu"):
        model, tok = tiny_model("llama", seed=0, **overrides)
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - model.get_input_embeddings().weight.numel()

    cfg = TARConfig(
        inner_steps=args.inner_steps, tr_every=args.tr_every, trajectories=1, tr_loss="max_entropy",
        retain_representation=True, clip_grad_norm=1.0, seed=0,
        adversaries=[AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=2e-5)],
    )
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-5), tokenizer=tok,
                       sharding={"activation_checkpointing": args.activation_checkpointing})
    n_outer = args.warmup + args.steps
    batches = random_batches(vocab, cfg.stream_steps(), n_outer, args.batch_size, args.seq_len)

    class Timer(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if batch_idx + 1 == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    forward_dtypes: set[str] = set()  # dtype of a projection weight as the forward sees it (after all-gather)
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, inputs: forward_dtypes.add(str(mod.weight.dtype).replace("torch.", "")))
    timer = Timer()
    trainer = L.Trainer(
        accelerator="cuda" if cuda else "cpu", devices=1, precision="bf16-mixed",
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        max_steps=n_outer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], use_distributed_sampler=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))

    # restore exactness on the FSDP2 shards: snapshot, one SGD step through the sharded model, restore
    params = module.trainable_parameters()
    snap = ParameterSnapshot(params)
    before = [local_tensor(p.detach()).clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3)
    ids = batches[0]["forget"]["input_ids"][0].to(trainer.strategy.root_device)
    with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
        loss = module.model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    attacked = not snap.matches()
    snap.restore()
    exact = attacked and all(torch.equal(local_tensor(p.detach()), b) for p, b in zip(params, before, strict=True))

    timed = timer.times[args.warmup:]
    micro = args.batch_size * args.seq_len
    n_tr = len(cfg.tr_points())
    token_passes = (args.inner_steps + n_tr + 1) * micro  # adversary + TR + retain forward+backward
    flops = 6 * n_matmul * token_passes + 2 * n_matmul * micro  # + the reference forward
    seconds = sum(timed) / len(timed)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = bf16_peak(name) if cuda else None
    result = {
        "device": name,
        "parameters": n_params,
        "matmul_parameters": n_matmul,
        "layers": args.layers,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "inner_steps": args.inner_steps,
        "tr_evaluations": n_tr,
        "activation_checkpointing": args.activation_checkpointing,
        "param_dtypes_in_forward": sorted(forward_dtypes),
        "master_param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
        "sharded": type(module.model).__name__.startswith("FSDP"),
        "seconds_per_outer_step": seconds,
        "outer_step_seconds_all": timer.times,
        "token_passes_per_outer_step": token_passes,
        "tokens_per_s": token_passes / seconds,
        "model_flops_per_outer_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "bf16_peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "restore_attacked_the_weights": attacked,
        "restore_bit_exact": exact,
        "global_step": trainer.global_step,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
