"""Persistent adversaries: train-time attacks that continue where earlier outer steps left off.

TAR's first-order tamper-resistance gradient only shapes the loss landscape within the K adversary steps of one
outer step, while real fine-tuning attacks run for hundreds or thousands of steps (on the demo's knowledge
world recovery happened between attack steps 50 and 200 against a train-time horizon of K ≤ 32). Raising K raises the cost of
every outer step linearly. A pool of *attacked deltas* δ = θ'_K − θ (where a trajectory ended, relative to the
weights it started from) lets a later trajectory start at θ_now + δ and run K more steps, so the horizon the
defender sees grows to ``horizon`` steps at the cost of K per outer step — the replay idea of persistent
contrastive divergence applied to the adversary.

Only full-parameter trajectories are stored (a LoRA trajectory's adapters are discarded, its base delta is
zero). A continued trajectory keeps the adversary and LR it was sampled with and trains on the adversary's own
data (a retain→forget switch already happened). Deltas are rank-local: the same on every data-parallel rank
under DDP (whose weights are identical), each rank's own shards under FSDP2 (so each rank checkpoints its own
part). They live on ``device`` (``"cpu"`` keeps accelerator memory free: each entry is one copy of the trainable
weights, or of this rank's shards). A schedule-free adversary's delta is taken at its evaluation point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from tar_lightning.errors import ConfigError
from tar_lightning.snapshot import ParameterSnapshot, local_tensor

__all__ = ["AdversaryPool", "PoolEntry"]


def _shard_groups(params: Sequence[Tensor]) -> list:
    """The process groups over which ``params`` (FSDP2 ``DTensor`` s) are sharded; empty for plain tensors."""
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    return [mesh.get_group(dim) for mesh in meshes for dim in range(mesh.ndim)]


@dataclass
class PoolEntry:
    """One stored trajectory: its weight delta, the adversary (index in the family), its LR and its length."""

    delta: list[Tensor]
    adversary: int
    lr: float
    steps: int


class AdversaryPool:
    """A bounded pool of attacked deltas (see the module docstring).

    Args:
        size: the most entries kept; a new trajectory replaces a random entry once the pool is full.
        horizon: an entry that has run this many adversary steps in total is retired.
        device: where the deltas live (``None``: next to the weights).
    """

    def __init__(self, size: int, horizon: int, device: Optional[str] = None) -> None:
        self.size = size
        self.horizon = horizon
        self.device = device
        self.entries: list[PoolEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def apply(self, index: int, params: Sequence[Tensor]) -> PoolEntry:
        """Move the weights to where entry ``index`` ended: θ ← θ + δ (in place, rank-local storage)."""
        entry = self.entries[index]
        local = [local_tensor(p.detach()) for p in params]
        torch._foreach_add_(local, [d.to(device=t.device, dtype=t.dtype) for d, t in zip(entry.delta, local, strict=True)])
        return entry

    @torch.no_grad()
    def record(
        self,
        params: Sequence[Tensor],
        start: ParameterSnapshot,
        *,
        continued: Optional[int],
        adversary: int,
        lr: float,
        steps: int,
        replace: int = 0,
    ) -> None:
        """Store where a trajectory ended (θ' − θ_start).

        ``continued`` is the entry the trajectory continued (updated in place, retired at ``horizon``) or
        ``None`` for a fresh one, which is appended, or replaces entry ``replace % size`` of a full pool.
        """
        delta = [
            (local_tensor(p.detach()) - s.to(p.device)).to(self.device or p.device)
            for p, s in zip(params, start.saved, strict=True)
        ]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(delta))).all().to(torch.int32)
        for group in _shard_groups(params):  # FSDP2: every rank checked its shards; all take the same decision
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=group)
        if not bool(finite):
            # a diverged trajectory (its outer step is skipped by the non-finite guard) is never continued
            if continued is not None:
                del self.entries[continued]
            return
        if continued is not None:
            entry = self.entries[continued]
            entry.delta = delta
            entry.steps += steps
            if entry.steps >= self.horizon:
                del self.entries[continued]
            return
        entry = PoolEntry(delta=delta, adversary=adversary, lr=float(lr), steps=steps)
        if steps >= self.horizon:
            return
        if len(self.entries) < self.size:
            self.entries.append(entry)
        else:
            self.entries[replace % self.size] = entry

    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": [
                {"delta": [d.cpu() for d in e.delta], "adversary": e.adversary, "lr": e.lr, "steps": e.steps}
                for e in self.entries
            ]
        }

    def load_state_dict(self, state: dict[str, Any], like: Sequence[Tensor]) -> None:
        """Restore entries; ``like`` (the trainable parameters) gives each delta its device and dtype."""
        entries = []
        like = [local_tensor(p.detach()) for p in like]
        for i, e in enumerate(state.get("entries", [])):
            if len(e["delta"]) != len(like) or any(
                tuple(d.shape) != tuple(p.shape) for d, p in zip(e["delta"], like, strict=True)
            ):
                raise ConfigError(
                    f"checkpointed adversary pool entry {i}: its {len(e['delta'])} deltas do not match the "
                    f"{len(like)} trainable parameters (or their local shards) of this run; a pool saved with a "
                    "different model, set of trainable parameters or number of FSDP2 ranks cannot be resumed"
                )
            delta = [d.to(device=self.device or p.device, dtype=p.dtype) for d, p in zip(e["delta"], like, strict=True)]
            entries.append(PoolEntry(delta=delta, adversary=int(e["adversary"]), lr=float(e["lr"]), steps=int(e["steps"])))
        self.entries = entries
