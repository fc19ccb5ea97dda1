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

With ``persistent_state: full`` (``TARConfig``) an entry also holds the adversary optimizer's state and its LR
schedule's position (:func:`optimizer_state` / :func:`load_optimizer_state`), so a continued trajectory is
exactly the next K steps of one longer attack; the delta is then taken at the optimizer's training point (a
schedule-free adversary's y, from which its next step starts). The state is stored like the deltas: each
parameter's state tensors as this rank's local shards (FSDP2) on ``device``, rebuilt as ``DTensor`` s of the
parameter's mesh and placements when loaded; the pool's :meth:`AdversaryPool.state_dict` carries it into
checkpoints (per rank under FSDP2). MUDMAN's forked adversary (``fork_every``) is a pool of one *absolute* entry
(``relative=False``): it stores the attacked weights themselves, and a continued trajectory starts from them,
not from the current weights plus a delta.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from tar_lightning.errors import ConfigError
from tar_lightning.snapshot import ParameterSnapshot, local_tensor

__all__ = ["AdversaryPool", "PoolEntry", "load_optimizer_state", "optimizer_state"]

# Optimizer hyperparameters that belong to the running optimizer, not to the attack's position.
_GROUP_KEYS_KEPT = ("params", "train_mode")


def _shard_groups(params: Sequence[Tensor]) -> list:
    """The process groups over which ``params`` (FSDP2 ``DTensor`` s) are sharded; empty for plain tensors."""
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    return [mesh.get_group(dim) for mesh in meshes for dim in range(mesh.ndim)]


def _copy_value(value: Any, device: Optional[str]) -> Any:
    if isinstance(value, Tensor):
        local = local_tensor(value.detach())
        # scalars (step counts) stay where the optimizer keeps them (CPU unless capturable/fused)
        return local.to(device=device or local.device, copy=True) if local.dim() else local.clone()
    return copy.deepcopy(value)


@torch.no_grad()
def optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], scheduler: Any = None, device: Optional[str] = None
) -> dict[str, Any]:
    """A copy of an adversary optimizer's state (and its LR scheduler's), rank-local, to continue it later.

    Args:
        optimizer: the adversary's optimizer (one whose parameters are ``params``, in any group order).
        params: the parameters it trains; the state is listed in this order.
        scheduler: its LR scheduler (``None``: none).
        device: where tensor state lives (``None``: next to the parameter); 0-dim tensors (step counts) stay put.

    Returns:
        ``{"state": [per parameter {key: value}], "groups": [hyperparameters per group], "scheduler": ...}``;
        tensor values are copies of the local shards (FSDP2), never references to the optimizer's tensors.
    """
    return {
        "state": [{k: _copy_value(v, device) for k, v in optimizer.state.get(p, {}).items()} for p in params],
        "groups": [
            {k: copy.deepcopy(v) for k, v in group.items() if k not in _GROUP_KEYS_KEPT}
            for group in optimizer.param_groups
        ],
        "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
    }


@torch.no_grad()
def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], state: dict[str, Any], scheduler: Any = None
) -> None:
    """Put a state from :func:`optimizer_state` into a fresh optimizer of the same kind over the same parameters.

    A tensor whose shape is the parameter's local shape becomes a tensor like the parameter (a ``DTensor`` of its
    mesh and placements under FSDP2) holding the stored local values; a 0-dim tensor (a step count) goes to the
    parameter's device when the group is ``capturable`` or ``fused`` (where torch keeps it then), else to the CPU;
    other tensors go to the parameter's device. The groups' hyperparameters (LR, schedule-free's ``k`` and
    ``weight_sum``, ...) and the scheduler's position are restored too.

    Raises:
        ConfigError: the state lists another number of parameters or groups than ``optimizer`` has.
    """
    if len(state["state"]) != len(params) or len(state["groups"]) != len(optimizer.param_groups):
        raise ConfigError(
            f"adversary optimizer state of {len(state['state'])} parameters in {len(state['groups'])} groups cannot "
            f"continue an optimizer of {len(params)} parameters in {len(optimizer.param_groups)} groups"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for group, saved in zip(optimizer.param_groups, state["groups"], strict=True):
        group.update({k: copy.deepcopy(v) for k, v in saved.items() if k not in _GROUP_KEYS_KEPT})
    for p, saved in zip(params, state["state"], strict=True):
        local = local_tensor(p.detach())
        group = group_of.get(id(p), {})
        restored = {}
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                restored[key] = copy.deepcopy(value)
            elif value.dim() == 0:
                on_device = bool(group.get("capturable")) or bool(group.get("fused"))
                restored[key] = value.to(device=local.device if on_device else "cpu", copy=True)
            elif tuple(value.shape) == tuple(local.shape):
                like = torch.empty_like(p.detach(), dtype=value.dtype)
                local_tensor(like).copy_(value)
                restored[key] = like
            else:
                restored[key] = value.to(device=local.device, copy=True)
        if restored:
            optimizer.state[p] = restored
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))


def _state_to(state: Optional[dict[str, Any]], device: Any) -> Optional[dict[str, Any]]:
    """``state`` with the tensors of its per-parameter state moved to ``device`` (``None``: kept); 0-dim tensors
    (step counts) only when ``device`` is the CPU (a checkpoint), else :func:`load_optimizer_state` places them."""
    if state is None:
        return None

    def move(v: Any) -> Any:
        wanted = device is not None and (v.dim() or str(device) == "cpu") if isinstance(v, Tensor) else False
        return v.to(device) if wanted else v

    return {**state, "state": [{k: move(v) for k, v in s.items()} for s in state["state"]]}


@dataclass
class PoolEntry:
    """One stored trajectory: its weight delta (or, in an absolute pool, its weights), the adversary (index in the
    family), its LR, its length and (``persistent_state: full``) its optimizer state (:func:`optimizer_state`)."""

    delta: list[Tensor]
    adversary: int
    lr: float
    steps: int
    optimizer: Optional[dict[str, Any]] = None


class AdversaryPool:
    """A bounded pool of attacked deltas (see the module docstring).

    Args:
        size: the most entries kept; a new trajectory replaces a random entry once the pool is full.
        horizon: an entry that has run this many adversary steps in total is retired.
        device: where the deltas live (``None``: next to the weights).
        relative: store θ' − θ_start and continue from θ_now + δ (the pool); ``False``: store θ' and continue
            from θ' itself (MUDMAN's forked adversary, which does not follow the outer updates).
    """

    def __init__(self, size: int, horizon: int, device: Optional[str] = None, relative: bool = True) -> None:
        self.size = size
        self.horizon = horizon
        self.device = device
        self.relative = relative
        self.entries: list[PoolEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def apply(self, index: int, params: Sequence[Tensor]) -> PoolEntry:
        """Move the weights to where entry ``index`` ended: θ ← θ + δ (absolute pool: θ ← θ'), in place, rank-local."""
        entry = self.entries[index]
        local = [local_tensor(p.detach()) for p in params]
        stored = [d.to(device=t.device, dtype=t.dtype) for d, t in zip(entry.delta, local, strict=True)]
        if self.relative:
            torch._foreach_add_(local, stored)
        else:
            torch._foreach_copy_(local, stored)
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
        optimizer: Optional[dict[str, Any]] = None,
    ) -> None:
        """Store where a trajectory ended (θ' − θ_start; absolute pool: θ').

        ``continued`` is the entry the trajectory continued (updated in place, retired at ``horizon``) or
        ``None`` for a fresh one, which is appended, or replaces entry ``replace % size`` of a full pool.
        ``optimizer`` is the adversary's state to continue with (:func:`optimizer_state`), or ``None``.
        """
        if self.relative:
            delta = [
                (local_tensor(p.detach()) - s.to(p.device)).to(self.device or p.device)
                for p, s in zip(params, start.saved, strict=True)
            ]
        else:
            delta = [local_tensor(p.detach()).to(self.device or p.device, copy=True) for p in params]
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
            entry.optimizer = optimizer
            entry.steps += steps
            if entry.steps >= self.horizon:
                del self.entries[continued]
            return
        entry = PoolEntry(delta=delta, adversary=adversary, lr=float(lr), steps=steps, optimizer=optimizer)
        if steps >= self.horizon:
            return
        if len(self.entries) < self.size:
            self.entries.append(entry)
        else:
            self.entries[replace % self.size] = entry

    def state_dict(self) -> dict[str, Any]:
        """The entries (deltas, and optimizer states when kept) on the CPU, for a checkpoint (this rank's part)."""
        entries = []
        for e in self.entries:
            entry = {"delta": [d.cpu() for d in e.delta], "adversary": e.adversary, "lr": e.lr, "steps": e.steps}
            if e.optimizer is not None:
                entry["optimizer"] = _state_to(e.optimizer, "cpu")
            entries.append(entry)
        return {"entries": entries}

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
            opt = e.get("optimizer")
            if opt is not None and len(opt["state"]) != len(like):
                raise ConfigError(
                    f"checkpointed adversary pool entry {i}: its optimizer state lists {len(opt['state'])} "
                    f"parameters, this run trains {len(like)}"
                )
            entries.append(PoolEntry(delta=delta, adversary=int(e["adversary"]), lr=float(e["lr"]),
                                     steps=int(e["steps"]), optimizer=_state_to(opt, self.device)))
        self.entries = entries
