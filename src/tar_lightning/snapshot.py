"""Rank-local parameter snapshot/restore and the tamper-resistance gradient buffer.

TAR attacks the live weights in place and restores them afterwards (cheaper in memory than a functional copy of
the model). Both helpers work on the *local* storage of each parameter, so they serve plain tensors and FSDP2
``DTensor`` shards alike: every rank saves and restores only its own shard. :func:`global_norm` is the 2-norm of
a list of tensors over all ranks (FSDP2 shards included), used by the buffer and by the gradient synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from tar_lightning.errors import ConfigError

__all__ = ["GradientBuffer", "ParameterSnapshot", "global_norm", "local_tensor"]


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local storage of ``t`` (the shard of a DTensor, or ``t`` itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@torch.no_grad()
def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all of ``tensors`` together, as a plain tensor, the same on every rank.

    Plain tensors: ``torch.nn.utils.get_total_norm`` (unchanged single-process numerics). When any is a DTensor
    (FSDP2 shards), the squared norms of the local shards are summed and all-reduced over each DTensor's mesh;
    plain tensors among them are taken as replicated (counted once).
    """
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


class ParameterSnapshot:
    """A bit-exact copy of a list of parameters, restorable in place.

    Args:
        params: the parameters to save (their identity is kept: restore writes into the same tensors, so
            optimizers holding references stay valid).
        device: where to keep the copy (``None``: next to the parameter; ``"cpu"`` frees accelerator memory
            for large models at the price of a host round trip per trajectory).
    """

    def __init__(self, params: Sequence[Tensor], device: str | torch.device | None = None) -> None:
        self.params = list(params)
        with torch.no_grad():
            self.saved = [
                local_tensor(p.detach()).to(device=device or p.device, copy=True) for p in self.params
            ]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into the parameters (bit-exact)."""
        torch._foreach_copy_([local_tensor(p.detach()) for p in self.params], self.saved)

    @torch.no_grad()
    def matches(self) -> bool:
        """Whether every parameter currently equals its saved value bit for bit."""
        return all(torch.equal(local_tensor(p.detach()), s.to(p.device)) for p, s in zip(self.params, self.saved, strict=True))


class GradientBuffer:
    """Accumulates gradients of several backward passes that are interleaved with unrelated ones.

    TAR sums tamper-resistance gradients taken at successive attacked weights while the adversary's own
    backward passes run in between. Instead of copying ``.grad`` into a buffer after every TR backward, the
    buffer's tensors are swapped *into* ``.grad`` before the backward (autograd then accumulates in place) and
    swapped out after it: no extra copies, one gradient-sized buffer.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.grads: list[Tensor | None] = [None] * len(self.params)

    def swap_in(self) -> None:
        """Make the buffered gradients the parameters' ``.grad`` (to accumulate into them)."""
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def swap_out(self) -> None:
        """Take the parameters' ``.grad`` back into the buffer and clear ``.grad``."""
        for i, p in enumerate(self.params):
            self.grads[i] = p.grad
            p.grad = None

    def norm(self) -> Tensor:
        """The 2-norm of the buffered gradients (0 when empty); global over ranks for FSDP2 ``DTensor`` shards."""
        grads = [g for g in self.grads if g is not None]
        if not grads:
            return torch.zeros(())
        if any(getattr(g, "to_local", None) is not None for g in grads):
            return global_norm(grads)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
