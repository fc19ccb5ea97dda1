"""Choosing a Lightning strategy for TAR, and averaging gradients over data-parallel ranks by hand.

TAR's outer step runs many forward/backward passes (the adversary's inner loop, the tamper-resistance and retain
terms) on one batch. Lightning's DDP wrapper expects one backward per forward: its reducer errors or
double-reduces when armed several times. :class:`~tar_lightning.TARModule` therefore never arms it: under
``strategy="ddp"`` its ``training_step`` calls the unwrapped model and never ``manual_backward`` (Lightning's
forward redirection keeps the reducer disarmed in manual optimization), and it averages gradients itself with
:func:`average_gradients`: one flattened all-reduce per adversary step (so the attacked weights stay identical on
every rank) and two per outer step (the TR buffer, then the retain gradient). DDP is kept for what it does well
here: process setup, the initial parameter broadcast, and Lightning's distributed plumbing.

Memory model used by :func:`select_strategy` (``P`` = parameter bytes in the training dtype)::

    TAR state ≈ 8·P = params P + grads P + snapshot P + TR buffer P
                      + inner (adversary, AdamW) state 2·P + outer (AdamW) state 2·P

plus activations. The model is replicated (DDP) when ``8·P`` fits in ``memory_fraction`` of one device's memory,
otherwise it is sharded: FSDP2 through Lightning's ``ModelParallelStrategy(data_parallel_size=W,
tensor_parallel_size=1)``, with :meth:`TARModule.configure_model` applying ``fully_shard`` to every decoder layer
and the root. Under FSDP2 the gradients are averaged by FSDP itself (reduce-scatter in every backward), so the
manual averaging below is off (:func:`has_sharded_parameters`) and the global gradient norm comes from
:func:`global_norm`.

Using it: recipes may write ``trainer.strategy: ddp`` directly (it is what ``auto`` picks for models that fit);
code and the CLI call :func:`select_strategy` to choose. It is a function rather than a name registered with
Lightning's ``StrategyRegistry`` because a registered name is instantiated without seeing the device count or
the model, which the choice needs. :meth:`TARModule._check_trainer` refuses FSDP1 (and a ModelParallelStrategy
with tensor parallelism) whatever way the strategy was chosen.

FSDP2 options (mixed-precision policy, activation checkpointing, resharding) are ``TARModule(sharding=...)``, see
:mod:`tar_lightning.sharding`; ready-made overlays for 1 node x 8 GPUs and 2 nodes x 8 GPUs, Slurm templates
and the safe requeue callback are in ``recipes/launch/`` and ``callbacks/slurm_requeue.yaml``; the memory and time
arithmetic for 8B models is in ``docs/SCALING.md``.

Under DDP, Lightning's wrapper still broadcasts buffers at each ``training_step`` call (cheap: rotary tables) and
the ranks' local losses are logged unsynchronized; the logged ``train/grad_norm`` is the global one.

Token weighting: each rank's losses are token means over its own micro-batch; averaging rank gradients equals the
gradient of the global token mean only when all ranks hold the same number of label tokens. With padding the
difference is of relative size ``|n_r - n̄| / n̄`` per term (n_r: a rank's label tokens); fixed-length packed
sequences (what :class:`~tar_lightning.data.TARDataModule` builds) make it exact up to float reduction order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from tar_lightning.errors import ConfigError

__all__ = [
    "FSDP1_REFUSAL",
    "TENSOR_PARALLEL_REFUSAL",
    "TAR_STATE_FACTOR",
    "average_gradients",
    "check_strategy",
    "data_parallel_world_size",
    "global_norm",
    "has_sharded_parameters",
    "select_strategy",
    "tar_state_bytes",
]

# params + grads + snapshot + TR buffer + adversary AdamW (2) + outer AdamW (2)
TAR_STATE_FACTOR = 8

FSDP1_REFUSAL = (
    "strategy='fsdp' (FSDP1) is not supported with TARModule: Lightning runs training_step inside the FSDP "
    "wrapper's forward, so TAR's several backward passes per step (the adversary's inner loop, the TR and "
    "retain terms) break its unshard/reshard bookkeeping (Lightning issues #19626, #19685), and FSDP1 is "
    "GPU-only. Use strategy='ddp' when the model with its TAR state (~8x the parameter bytes) fits on one "
    "device; sharding will use FSDP2 (ModelParallelStrategy), see tar_lightning.strategy.select_strategy"
)
TENSOR_PARALLEL_REFUSAL = (
    "ModelParallelStrategy with tensor_parallel_size={tp!r}: TARModule shards with FSDP2 only (data parallel); "
    "use ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1), which is what "
    "tar_lightning.strategy.select_strategy('fsdp2', devices=..., num_nodes=...) returns"
)


def tar_state_bytes(model: Union[nn.Module, int]) -> int:
    """Bytes of a model's TAR training state, ``TAR_STATE_FACTOR`` × its trainable parameter bytes.

    ``model`` may also be the parameter byte count itself. Activations are not included.
    """
    if isinstance(model, int):
        return TAR_STATE_FACTOR * model
    return TAR_STATE_FACTOR * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _device_memory(accelerator: str) -> int:
    if accelerator in ("cuda", "gpu") and torch.cuda.is_available():
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    try:  # host memory (CPU "devices" are processes sharing it; the caller divides by their number)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _count_devices(devices: Any, accelerator: str) -> int:
    if devices is None or devices == "auto":
        if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        devices = devices.strip()
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        if devices == "-1":
            return _count_devices("auto", accelerator)
        devices = int(devices)
    if devices == -1:
        return _count_devices("auto", accelerator)
    return int(devices)


def select_strategy(
    name: str = "auto",
    devices: Any = "auto",
    model: Union[None, nn.Module, int] = None,
    *,
    accelerator: str = "auto",
    num_nodes: int = 1,
    device_memory_bytes: Optional[int] = None,
    memory_fraction: float = 0.8,
) -> Any:
    """The Lightning strategy (a ``Trainer(strategy=...)`` value) to train ``model`` with TAR.

    Args:
        name: ``auto`` (choose, see below), ``single_device``, ``ddp`` (also ``ddp_spawn``), ``fsdp2`` (also
            ``model_parallel``); ``fsdp`` (FSDP1) is refused.
        devices: the Trainer's ``devices`` (per node).
        model: the model (or its parameter byte count); needed by ``auto`` with several devices.
        accelerator: the Trainer's accelerator; ``cuda``/``gpu`` devices are sized by their memory, CPU
            processes by an equal share of host memory.
        num_nodes: the Trainer's ``num_nodes``.
        device_memory_bytes: the memory of one device (default: measured).
        memory_fraction: the share of a device's memory the TAR state may take (the rest is activations).

    ``auto``: one device in total → ``"auto"`` (Lightning's single-device strategy); several, and
    :func:`tar_state_bytes` fits in ``memory_fraction`` of one device → ``"ddp"``; otherwise FSDP2.

    Returns:
        a strategy name, or for FSDP2 a ``ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1)``
        object (W = devices × nodes).

    Raises:
        ConfigError: ``fsdp``; an unknown name; ``auto`` with several devices and no model.
    """
    key = name.strip().lower()
    if key in ("fsdp", "fsdp1"):
        raise ConfigError(FSDP1_REFUSAL)
    if key in ("fsdp2", "model_parallel"):
        return _fsdp2(_count_devices(devices, accelerator) * num_nodes)
    if key in ("single_device", "ddp", "ddp_spawn"):
        return "auto" if key == "single_device" else key
    if key != "auto":
        raise ConfigError(f"strategy={name!r}: expected one of auto, single_device, ddp, ddp_spawn, fsdp2")
    world = _count_devices(devices, accelerator) * num_nodes
    if world <= 1:
        return "auto"
    if model is None:
        raise ConfigError("select_strategy('auto') with several devices needs the model (or its parameter bytes)")
    memory = device_memory_bytes
    if memory is None:
        memory = _device_memory(accelerator)
        if accelerator not in ("cuda", "gpu") or not torch.cuda.is_available():
            memory //= max(1, _count_devices(devices, accelerator))
    need = tar_state_bytes(model)
    if need <= memory_fraction * memory:
        return "ddp"
    return _fsdp2(world)


def _fsdp2(world: int) -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=max(1, world), tensor_parallel_size=1)


def check_strategy(strategy: Any) -> None:
    """Refuses a Lightning strategy object TARModule cannot train under (FSDP1; tensor parallelism).

    Raises:
        ConfigError: with the reason and what to use instead.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ConfigError(FSDP1_REFUSAL)
    if isinstance(strategy, ModelParallelStrategy):
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        if tp != 1:
            raise ConfigError(TENSOR_PARALLEL_REFUSAL.format(tp=tp))


def has_sharded_parameters(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is an FSDP2 ``DTensor`` (its gradients are then averaged by FSDP itself)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


@torch.no_grad()
def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all of ``tensors`` together, as a plain tensor, the same on every rank.

    Plain tensors: ``torch.nn.utils.get_total_norm`` (unchanged single-process numerics). When any is a DTensor
    (FSDP2 shards), the squared norms of the local shards are summed and all-reduced over each DTensor's mesh;
    plain tensors among them are taken as replicated (counted once).
    """
    from torch.distributed.tensor import DTensor

    tensors = [t for t in tensors if t is not None]
    if not any(isinstance(t, DTensor) for t in tensors):
        return torch.nn.utils.get_total_norm(tensors)
    total: Optional[Tensor] = None
    by_mesh: dict[Any, list[Tensor]] = {}
    plain: list[Tensor] = []
    for t in tensors:
        if isinstance(t, DTensor):
            if any(not pl.is_shard() for pl in t.placements):
                raise ConfigError(f"global_norm: expected FSDP2 shards (Shard placements), got {t.placements}")
            by_mesh.setdefault(t.device_mesh, []).append(t.to_local())
        else:
            plain.append(t)
    for mesh, locals_ in by_mesh.items():
        sq = torch.stack([n.float() for n in torch._foreach_norm(locals_)]).square().sum()
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(sq, group=mesh.get_group(dim))
        total = sq if total is None else total + sq
    if plain:
        sq = torch.stack([n.float() for n in torch._foreach_norm(plain)]).square().sum()
        total = sq if total is None else total + sq.to(total.device)
    return total.sqrt()


def data_parallel_world_size() -> int:
    """The number of data-parallel ranks whose gradients must be averaged by hand (1 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def average_gradients(grads: Sequence[Optional[Tensor]]) -> None:
    """Averages gradients in place over all ranks of the default process group (no-op on one rank).

    One all-reduce per (dtype, device) bucket of the flattened gradients; ``None`` entries are skipped (every
    rank must have the same ``None`` pattern, which holds when all ranks run the same graph). Cost: one
    gradient-sized copy in and out of the flat buffer plus the all-reduce of ``P`` bytes.
    """
    world = data_parallel_world_size()
    if world <= 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for g in grads:
        if g is not None:
            buckets.setdefault((g.dtype, g.device), []).append(g)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world)
        torch._foreach_copy_(bucket, list(_unflatten_dense_tensors(flat, bucket)))
