"""The retain loss: next-token CE plus a representation-distance term to a frozen copy of the original model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tar_lightning.errors import ConfigError
from tar_lightning.losses._common import check_batch_seq, masked_mean
from tar_lightning.losses.ce import causal_lm_loss

__all__ = ["representation_distance", "retain_loss"]


def _as_layers(hidden_states: Sequence[Tensor] | Tensor, name: str) -> tuple[Tensor, ...]:
    if isinstance(hidden_states, Tensor):
        return (hidden_states,)
    layers = tuple(hidden_states)
    if not layers:
        raise ConfigError(f"{name} must hold at least one [batch, seq, hidden] tensor, got an empty sequence")
    return layers


def representation_distance(
    hidden_states: Sequence[Tensor],
    ref_hidden_states: Sequence[Tensor],
    attention_mask: Tensor | None = None,
    squared: bool = False,
) -> Tensor:
    """Mean over layers of the token-mean distance ``||h - h_ref||`` over the hidden dimension.

    Every tensor of the tuples counts, the embedding output included (as in the reference implementation).

    Args:
        hidden_states: ``[B, T, H]`` tensors of the trained model (HF ``output_hidden_states=True``).
        ref_hidden_states: the same from the frozen reference model; treated as constants (detached).
        attention_mask: ``[B, T]`` of 0/1; padding positions are left out. ``None`` counts every position.
        squared: use ``||h - h_ref||^2`` (the paper's formula) instead of ``||h - h_ref||`` (the reference
            code's choice, the default).

    Returns:
        A 0-dim fp32 tensor. Its gradient is finite (zero) where ``h == h_ref``, as at the start of training.

    Raises:
        ConfigError: the tuples are empty, differ in length, or hold tensors of different or non-3-D shapes;
            or ``attention_mask`` is not ``[B, T]``.
    """
    layers = _as_layers(hidden_states, "hidden_states")
    ref_layers = _as_layers(ref_hidden_states, "ref_hidden_states")
    if len(layers) != len(ref_layers):
        raise ConfigError(
            f"hidden_states has {len(layers)} tensors but ref_hidden_states has {len(ref_layers)}; "
            "they must come from models with the same number of layers"
        )
    distances = []
    for i, (h, h_ref) in enumerate(zip(layers, ref_layers, strict=True)):
        if h.shape != h_ref.shape or h.dim() != 3:
            raise ConfigError(
                f"hidden_states[{i}] has shape {tuple(h.shape)} but ref_hidden_states[{i}] has shape "
                f"{tuple(h_ref.shape)}; both must be the same [batch, seq, hidden]"
            )
        if i == 0:
            check_batch_seq(attention_mask, "attention_mask", tuple(h.shape[:2]))
            mask = (
                attention_mask.to(h.device) != 0
                if attention_mask is not None
                else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            )
        diff = h.float() - h_ref.detach().to(device=h.device, dtype=torch.float32)
        # Not sqrt(sum of squares): its derivative is infinite at h == h_ref, where vector_norm's backward is 0.
        per_token = diff.square().sum(dim=-1) if squared else torch.linalg.vector_norm(diff, dim=-1)
        distances.append(masked_mean(per_token, mask))
    return torch.stack(distances).mean()


def retain_loss(
    logits: Tensor,
    labels: Tensor,
    hidden_states: Sequence[Tensor] | None = None,
    ref_hidden_states: Sequence[Tensor] | None = None,
    attention_mask: Tensor | None = None,
    representation_weight: float = 1.0,
    squared: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Retain loss ``CE + representation_weight * representation_distance``.

    Args:
        logits: ``[B, T, V]`` outputs of the trained model on retain data.
        labels: ``[B, T]`` token ids, ``-100`` where ignored.
        hidden_states: the trained model's hidden states; needed when ``ref_hidden_states`` is given.
        ref_hidden_states: the frozen reference model's hidden states; ``None`` skips the representation term.
        attention_mask: ``[B, T]`` of 0/1 masking padding out of the representation term.
        representation_weight: weight of the representation term, >= 0.
        squared: use the squared L2 distance; see :func:`representation_distance`.

    Returns:
        ``(loss, parts)``: the 0-dim fp32 loss and a dict of detached components, ``"ce"`` and (when
        computed) ``"representation"`` (unweighted).

    Raises:
        ConfigError: ``representation_weight`` is negative or not finite, ``hidden_states`` is missing while
            ``ref_hidden_states`` is given, or shapes mismatch.
    """
    if (
        isinstance(representation_weight, bool)
        or not isinstance(representation_weight, (int, float))
        or not math.isfinite(representation_weight)
        or representation_weight < 0
    ):
        raise ConfigError(
            f"representation_weight must be a finite number >= 0, got {representation_weight!r}"
        )
    ce = causal_lm_loss(logits, labels)
    parts = {"ce": ce.detach()}
    if ref_hidden_states is None:
        return ce, parts
    if hidden_states is None:
        raise ConfigError("ref_hidden_states is given but hidden_states is None; pass both or neither")
    rep = representation_distance(hidden_states, ref_hidden_states, attention_mask, squared=squared)
    parts["representation"] = rep.detach()
    return ce + representation_weight * rep, parts
