"""FSDP2 sharding options of :class:`~tar_lightning.TARModule`: mixed precision and activation checkpointing.

``TARModule(..., sharding=ShardingConfig(...))`` (recipes: ``model.init_args.sharding``). Under
``ModelParallelStrategy`` (FSDP2) :func:`fully_shard_model` applies, in this order:

1. activation checkpointing on every decoder layer (``torch.distributed._composable.checkpoint``: the layer's
   activations are recomputed in backward; parameter names stay unchanged, so checkpoints and export do not
   see it). Applied under every strategy, not only FSDP2, when ``activation_checkpointing`` is set;
2. ``fully_shard`` on every decoder layer, then on the root, with a ``MixedPrecisionPolicy``.

Mixed precision: ``param_dtype`` is the dtype of the unsharded (all-gathered) parameters, i.e. of the forward and
backward compute; ``reduce_dtype`` that of the gradient reduce-scatter. The sharded parameters, the snapshot, the
TR buffer and both optimizers stay in the module's dtype (fp32 master weights). ``"auto"`` (the default) gives the
paper's bf16 mixed precision (bf16 params, fp32 reduce) when the Trainer's precision is ``bf16-mixed``, and no
policy otherwise, so the paper recipes under the ``recipes/launch`` FSDP2 overlays need no edits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from tar_lightning.errors import ConfigError
from tar_lightning.models import decoder_layer_class

__all__ = ["ShardingConfig", "apply_activation_checkpointing", "fully_shard_model"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclasses.dataclass
class ShardingConfig:
    """How TARModule shards (FSDP2) and checkpoints activations.

    Attributes:
        param_dtype: compute/all-gather dtype of the parameters under FSDP2: ``auto`` (bf16 when the Trainer's
            precision is ``bf16-mixed``, else the module's dtype), ``none`` (the module's dtype), ``bfloat16``,
            ``float32``. ``float16`` is refused (TAR's nested optimizers cannot share a gradient scaler).
        reduce_dtype: dtype of the gradient reduce-scatter: ``auto`` (float32 whenever params are cast), ``none``
            (the param dtype), ``float32``, ``bfloat16``.
        activation_checkpointing: recompute each decoder layer's activations in backward (less activation
            memory, ~1/3 more compute per pass).
        reshard_after_forward: FSDP2 frees each decoder layer's unsharded parameters after its forward (ZeRO-3,
            default; the root's are kept, FSDP2's own default) instead of keeping all of them until the backward
            (``false``, ZeRO-2-like: more memory, one all-gather less per pass).
    """

    param_dtype: Optional[str] = "auto"
    reduce_dtype: Optional[str] = "auto"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    def validate(self) -> ShardingConfig:
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, str) or (value not in _DTYPES and value not in ("auto", "none")):
                raise ConfigError(f"sharding.{key}={value!r}: expected one of auto, none, bfloat16, float32")
            if _DTYPES.get(value) is torch.float16:
                raise ConfigError(f"sharding.{key}={value!r}: fp16 needs a gradient scaler, which TAR's nested "
                                  "adversary optimizers cannot share; use bfloat16")
        for key in ("activation_checkpointing", "reshard_after_forward"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"sharding.{key}={getattr(self, key)!r}: expected true or false")
        return self

    @classmethod
    def from_value(cls, value: Any) -> ShardingConfig:
        """A ShardingConfig from ``None`` (defaults), a mapping of its fields, or itself; validated."""
        if value is None:
            return cls().validate()
        if isinstance(value, cls):
            return value.validate()
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigError(f"sharding: unknown keys {unknown}; expected some of {sorted(names)}")
            return cls(**value).validate()
        raise ConfigError(f"sharding={value!r}: expected a mapping of {[f.name for f in dataclasses.fields(cls)]}")

    def policy_dtypes(self, trainer_precision: Any = None) -> tuple[Optional[torch.dtype], Optional[torch.dtype]]:
        """``(param_dtype, reduce_dtype)`` of the FSDP2 MixedPrecisionPolicy, ``auto`` resolved."""
        param = self.param_dtype
        if param == "auto":
            param = "bfloat16" if str(trainer_precision) == "bf16-mixed" else None
        param_dtype = None if param in (None, "none") else _DTYPES[param]
        reduce = self.reduce_dtype
        if reduce == "auto":
            reduce = "float32" if param_dtype is not None else None
        reduce_dtype = None if reduce in (None, "none") else _DTYPES[reduce]
        return param_dtype, reduce_dtype


def _layers(model: nn.Module) -> list[nn.Module]:
    layer_cls = decoder_layer_class(model)
    return [m for m in model.modules() if isinstance(m, layer_cls)]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Activation checkpointing on every decoder layer (idempotent); returns the number of layers wrapped."""
    n = 0
    for layer in _layers(model):
        if not getattr(layer, "_tar_activation_checkpointing", False):
            checkpoint_activations(layer)
            layer._tar_activation_checkpointing = True
            n += 1
    return n


def fully_shard_model(model: nn.Module, mesh, config: Optional[ShardingConfig] = None,
                      trainer_precision: Any = None, *, activation_checkpointing: Optional[bool] = None,
                      inference_only: bool = False) -> None:
    """FSDP2: (activation checkpointing,) ``fully_shard`` on every decoder layer, then the root.

    No-op on a model that is already sharded. ``activation_checkpointing`` overrides the config's (the frozen
    reference model never needs it). ``inference_only``: a model that never runs a backward (the frozen
    reference) frees every unsharded parameter after its forward, the root's included (FSDP2 keeps the root's
    by default, for the backward that follows a training forward).
    """
    if isinstance(model, FSDPModule):
        return
    config = config if config is not None else ShardingConfig()
    if config.activation_checkpointing if activation_checkpointing is None else activation_checkpointing:
        apply_activation_checkpointing(model)
    param_dtype, reduce_dtype = config.policy_dtypes(trainer_precision)
    # None is FSDP2's default: reshard the layers after forward, keep the root (used again first in backward)
    reshard = True if inference_only else None if config.reshard_after_forward else False
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard,
              "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    for layer in _layers(model):
        if not isinstance(layer, FSDPModule):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
