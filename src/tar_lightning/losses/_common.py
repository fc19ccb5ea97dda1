"""Argument checks and small numeric helpers shared by the loss modules (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from tar_lightning.errors import ConfigError

IGNORE_INDEX = -100


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype reductions over ``t`` run in: at least fp32 (bf16/fp16 are upcast, fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(f"{name} must be a [batch, seq, vocab] tensor, got {got}")


def check_batch_seq(t: Tensor | None, name: str, shape: tuple[int, int]) -> None:
    """Check that a per-token tensor (labels, attention_mask, input_ids) has shape ``[batch, seq]``."""
    if t is None:
        return
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ConfigError(f"{name} must have shape [batch, seq] = {tuple(shape)}, got {got}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true; 0 (graph kept) when none is.

    Dividing by ``max(count, 1)`` instead of branching on ``count == 0`` keeps the function free of a
    host-device synchronisation, and the empty case is then exactly ``0 * values.sum()``.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
