"""The benchmark model both benchmarks measure: a compute-bound Llama for this CPU, and its CLI arguments."""

from __future__ import annotations

import argparse

import torch

from tar_lightning.models import tiny_model


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model size and batch shape options (defaults: 4 layers, hidden 256, vocab 4096, batch 4×128)."""
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688, help="Llama's 8/3·hidden rounded up to 16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The benchmark Llama (fp32, train mode), identically initialised on every call."""
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
    return model.float().train()
