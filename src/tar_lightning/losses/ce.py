"""Next-token cross-entropy and its negation (the TR ablation loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tar_lightning.losses._common import IGNORE_INDEX, check_batch_seq, check_logits, compute_dtype

__all__ = ["causal_lm_loss", "negative_ce_loss"]


def shifted_log_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of positions ``0..T-2`` and the labels they predict (``labels[:, 1:]``).

    The log-softmax is computed in at least fp32 directly from the (possibly bf16) logits, so the fp32
    log-probabilities are the only extra ``[B, T, V]`` tensor.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` token ids, ``-100`` where ignored.

    Returns:
        ``(log_probs [B, T-1, V], targets [B, T-1])``.

    Raises:
        ConfigError: ``logits`` is not 3-D or ``labels`` is not ``[B, T]``.
    """
    check_logits(logits)
    check_batch_seq(labels, "labels", tuple(logits.shape[:2]))
    log_probs = F.log_softmax(logits[:, :-1], dim=-1, dtype=compute_dtype(logits))
    return log_probs, labels[:, 1:]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled positions (the same value as Hugging Face's loss).

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``-100`` are ignored.

    Args:
        logits: ``[B, T, V]`` model outputs (fp32 or bf16).
        labels: ``[B, T]`` token ids, ``-100`` where ignored.

    Returns:
        A 0-dim fp32 tensor. When no position is labelled it is 0 and still attached to the graph (zero
        gradients, no NaN).

    Raises:
        ConfigError: ``logits`` is not 3-D or ``labels`` is not ``[B, T]``.
    """
    log_probs, targets = shifted_log_probs(logits, labels)
    total = F.nll_loss(
        log_probs.reshape(-1, log_probs.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum()
    # The sum over zero labelled positions is 0, so clamping the count avoids 0/0 without a data-dependent branch.
    return total / count.clamp(min=1).to(total.dtype)


def negative_ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The negated next-token cross-entropy, ``-causal_lm_loss(logits, labels)`` (TR ablation loss).

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` token ids, ``-100`` where ignored.

    Returns:
        A 0-dim fp32 tensor; 0 when no position is labelled.

    Raises:
        ConfigError: ``logits`` is not 3-D or ``labels`` is not ``[B, T]``.
    """
    return torch.neg(causal_lm_loss(logits, labels))
