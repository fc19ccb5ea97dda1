"""How :class:`~tar_lightning.TARModule`'s outer step synchronises gradients over data-parallel ranks.

Chosen once per fit by :func:`choose_gradient_sync` (from ``TARModule.configure_model``, once the strategy has
set up the process group and, under FSDP2, sharded the model), then called where an outer step needs the ranks
to agree:

1. before every adversary step (:meth:`GradientSync.watch_adversary`), so the attacked weights stay identical on
   every rank;
2. on the tamper-resistance gradient accumulated over the trajectories (:meth:`GradientSync.reduce_tr_gradient`);
3. on the retain gradient, which is then added to it (:meth:`GradientSync.backward_retain`);
4. for the norm of the outer gradient and its clipping (:meth:`GradientSync.clip_outer_gradient`).

The three cases:

- :class:`GradientSync`: one process; nothing to average.
- :class:`DDPSync`: several ranks with replicated weights. Lightning's DDP reducer is never armed (see
  :mod:`tar_lightning.strategy`): every gradient is averaged here with
  :func:`~tar_lightning.strategy.average_gradients`.
- :class:`FSDP2Sync`: sharded ``DTensor`` weights. Every backward reduce-scatters (averages) their gradients
  itself; only the plain tensors an adversary adds (LoRA adapters, replicated and initialised alike on every
  rank) are averaged here. The clip norm is the global one over all shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from tar_lightning.snapshot import GradientBuffer, local_tensor
from tar_lightning.strategy import (
    average_gradients,
    data_parallel_world_size,
    global_norm,
    has_sharded_parameters,
)

__all__ = ["DDPSync", "FSDP2Sync", "GradientSync", "choose_gradient_sync"]


class GradientSync:
    """Gradient synchronisation of one process: nothing to average (see the module docstring)."""

    mode = "none"

    def watch_adversary(self, optimizer: torch.optim.Optimizer, trainable: Sequence[Tensor]) -> None:
        """Arrange for the gradients of ``trainable`` to be averaged before every step of ``optimizer``."""

    def reduce_tr_gradient(self, tr_grads: GradientBuffer) -> None:
        """Average the accumulated tamper-resistance gradient."""

    def backward_retain(self, loss: Tensor, params: Sequence[Tensor], tr_grads: GradientBuffer) -> None:
        """Backward of the (weighted) retain loss, leaving ``∇loss + TR gradient`` in the parameters' ``.grad``.

        Here the TR buffer is swapped into ``.grad`` and the backward accumulates into it.
        """
        tr_grads.swap_in()
        loss.backward()

    def total_norm(self, grads: list[Tensor]) -> Tensor:
        """The 2-norm of ``grads`` together (non-empty)."""
        return torch.nn.utils.get_total_norm(grads)

    def clip(self, params: Sequence[Tensor], grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
        """Scale ``grads`` (the ``.grad`` of ``params``) in place to a norm of at most ``max_norm``."""
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)

    def clip_outer_gradient(
        self, params: Sequence[Tensor], max_norm: Optional[float], device: torch.device
    ) -> Tensor:
        """Clip the outer gradient (in ``.grad``) to ``max_norm`` (``None``: no clipping); returns its norm before.

        The norm is always computed: the non-finite guard checks every gradient through it.
        """
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        total_norm = self.total_norm(grads)
        if max_norm is not None:
            self.clip(params, grads, max_norm, total_norm)
        return total_norm


class DDPSync(GradientSync):
    """Several ranks with replicated weights: every gradient is averaged here (one flattened all-reduce each)."""

    mode = "ddp"

    def watch_adversary(self, optimizer: torch.optim.Optimizer, trainable: Sequence[Tensor]) -> None:
        _average_before_step(optimizer, list(trainable))

    def reduce_tr_gradient(self, tr_grads: GradientBuffer) -> None:
        average_gradients(tr_grads.grads)

    def backward_retain(self, loss: Tensor, params: Sequence[Tensor], tr_grads: GradientBuffer) -> None:
        """The retain gradient is averaged alone, then the (already averaged) TR buffer is added."""
        loss.backward()
        average_gradients([p.grad for p in params])
        with torch.no_grad():
            for p, g in zip(params, tr_grads.grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)


class FSDP2Sync(GradientSync):
    """Sharded ``DTensor`` weights: FSDP averages their gradients in every backward; the clip norm is global.

    Args:
        world: the number of data-parallel ranks.
    """

    mode = "fsdp2"

    def __init__(self, world: int) -> None:
        self.world = world

    def watch_adversary(self, optimizer: torch.optim.Optimizer, trainable: Sequence[Tensor]) -> None:
        if self.world > 1:  # LoRA adapters: plain tensors that no FSDP wrapper reduces
            _average_before_step(optimizer, [p for p in trainable if not isinstance(p, DTensor)])

    def total_norm(self, grads: list[Tensor]) -> Tensor:
        return global_norm(grads)

    def clip(self, params: Sequence[Tensor], grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
        """Every rank scales its local shards by the same factor (from the global norm)."""
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_([local_tensor(g) for g in grads], coef)


def _average_before_step(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    if params:
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: average_gradients([p.grad for p in params]))


def choose_gradient_sync(params: Sequence[Tensor]) -> GradientSync:
    """The synchronisation for trainable parameters ``params`` in the current process group.

    FSDP2 when any is a sharded ``DTensor`` (on any number of ranks); DDP-style averaging when the default process
    group has several ranks; otherwise none.
    """
    world = data_parallel_world_size()
    if has_sharded_parameters(params):
        return FSDP2Sync(world)
    if world > 1:
        return DDPSync()
    return GradientSync()
