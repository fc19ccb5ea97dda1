"""Decoder-layer discovery, parameter counts, freezing and copies of a model (frozen, or on the meta device).

The decoder-layer class is discovered from the model (never hard-coded): it is the unit FSDP2 shards and
activation checkpointing wraps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tar_lightning.errors import ConfigError

__all__ = [
    "count_parameters",
    "decoder_layer_class",
    "decoder_layers",
    "freeze",
    "frozen_copy",
    "meta_copy",
    "trainable_parameters",
]

def decoder_layer_class(model: nn.Module) -> type[nn.Module]:
    """Discover the decoder-layer class of a transformer (the unit to shard or checkpoint).

    Uses the model's ``_no_split_modules`` declaration when it names a class present in the model; otherwise
    the class of the largest homogeneous ``nn.ModuleList`` (the stack of decoder layers).

    Raises:
        ConfigError: no repeated layer stack can be found.
    """
    present = {type(m).__name__: type(m) for m in model.modules()}
    for name in getattr(model, "_no_split_modules", None) or []:
        if name in present:
            return present[name]
    best: tuple[int, type[nn.Module]] | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                n = sum(p.numel() for p in module.parameters())
                if best is None or n > best[0]:
                    best = (n, next(iter(kinds)))
    if best is None:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}: no homogeneous ModuleList")
    return best[1]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """All instances of the decoder-layer class, in model order."""
    cls = decoder_layer_class(model)
    return [m for m in model.modules() if isinstance(m, cls)]


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters of ``model`` that require gradients (shared parameters appear once)."""
    return (p for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model``; tied (shared) parameters are counted once.

    Args:
        model: any module.
        trainable_only: count only parameters that require gradients.

    Returns:
        The total number of elements.
    """
    params = trainable_parameters(model) if trainable_only else model.parameters()
    return sum(p.numel() for p in params)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter frozen (in place); returns it.

    Eval mode is set by the ``training`` flag of every submodule, as ``nn.Module.train(False)`` sets it, without
    calling ``train()`` overrides: transformers' override re-kernelizes a model loaded with Hub kernels
    (``use_kernels``), which fails on the meta device (:func:`meta_copy`) and is not wanted for a frozen copy.
    """
    for module in model.modules():
        module.training = False
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen.

    This is the fixed reference model of the representation retain loss: it never trains, never receives
    gradients, and is unaffected by later changes to ``model``.

    Args:
        model: the model to copy (left untouched).

    Returns:
        The frozen copy.
    """
    return freeze(copy.deepcopy(model))


def meta_copy(
    model: nn.Module, *, param_dtype: torch.dtype | None = None, buffer_dtype: torch.dtype | None = None
) -> nn.Module:
    """A copy of ``model``'s structure whose parameters and buffers live on the meta device (no memory, no values).

    Same classes, config and parameter names, tied parameters still tied; nothing is copied from the tensors but
    their shapes. Materialise it with ``to_empty`` (after ``fully_shard``, only the local shards are allocated)
    and fill in the values.

    Args:
        model: the model (not sharded: call it before ``fully_shard``); left untouched.
        param_dtype: dtype of the floating-point parameters (default: each keeps its own).
        buffer_dtype: dtype of the floating-point buffers (default: each keeps its own).

    Returns:
        The meta-device copy, frozen and in eval mode.
    """

    def on_meta(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return torch.empty_like(t, device="meta", dtype=dtype if dtype is not None and t.is_floating_point() else None)

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(on_meta(p, param_dtype), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = on_meta(b, buffer_dtype)
    return freeze(copy.deepcopy(model, memo))
