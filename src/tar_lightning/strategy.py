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
otherwise it is sharded: FSDP2 through :class:`FSDP2Strategy` (Lightning's
``ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1)`` with all-or-nothing sharded saves and safe
loading), with :meth:`TARModule.configure_model` applying ``fully_shard`` to every decoder layer and the root. Under FSDP2 the gradients are averaged by FSDP itself (reduce-scatter in every backward), so the
manual averaging below is off (:func:`has_sharded_parameters`) and the global gradient norm comes from
:func:`global_norm` (defined in :mod:`tar_lightning.snapshot`, re-exported here).

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
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from tar_lightning.checkpoint import (
    CheckpointWriteError,
    NonFiniteError,
    atomic_save,
    fsync_dir,
    load_checkpoint,
    non_finite_entries,
    read_dcp_metadata,
    remove_checkpoint_path,
    reraise_dcp_errors,
    safe_dcp_reader,
    safe_load_planner,
)
from tar_lightning.errors import ConfigError, ModelLoadError
from tar_lightning.snapshot import global_norm

__all__ = [
    "FSDP1_REFUSAL",
    "RANK_LOCAL_KEY",
    "TENSOR_PARALLEL_REFUSAL",
    "TAR_STATE_FACTOR",
    "FSDP2Strategy",
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
        a strategy name, or for FSDP2 an :class:`FSDP2Strategy` (``data_parallel_size=W, tensor_parallel_size=1``,
        W = devices × nodes).

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
    return FSDP2Strategy(data_parallel_size=max(1, world), tensor_parallel_size=1)


def check_strategy(strategy: Any) -> None:
    """Refuses a Lightning strategy object TARModule cannot train under (FSDP1; tensor parallelism).

    Raises:
        ConfigError: with the reason and what to use instead.
    """
    if isinstance(strategy, FSDPStrategy):
        raise ConfigError(FSDP1_REFUSAL)
    if isinstance(strategy, ModelParallelStrategy):
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        if tp != 1:
            raise ConfigError(TENSOR_PARALLEL_REFUSAL.format(tp=tp))


def has_sharded_parameters(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is an FSDP2 ``DTensor`` (its gradients are then averaged by FSDP itself)."""
    return any(isinstance(p, DTensor) for p in params)


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
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for g in grads:
        if g is not None:
            buckets.setdefault((g.dtype, g.device), []).append(g)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world)
        torch._foreach_copy_(bucket, list(_unflatten_dense_tensors(flat, bucket)))


# ------------------------------------------------------------------------------ FSDP2 with all-or-nothing saves
#: Checkpoint key for state that differs per rank (e.g. the local shards of persistent adversaries): under
#: :class:`FSDP2Strategy` with sharded checkpoints each rank's value (tensors and plain containers) is saved to
#: ``rank_local.<rank>.pt`` in the checkpoint folder and given back, to that rank, under the same key on load.
RANK_LOCAL_KEY = "tar_rank_local"

_PARTIAL_SUFFIX = ".tar-partial"  # the new checkpoint being written: .<name>.tar-partial (never loaded)
_PREVIOUS_TAG = ".tar-previous"  # the old checkpoint during the swap: <stem>.tar-previous<suffix> (complete)


def partial_checkpoint_path(path: Path) -> Path:
    """Where :class:`FSDP2Strategy` writes a new sharded checkpoint before swapping it in at ``path``."""
    return path.with_name(f".{path.name}{_PARTIAL_SUFFIX}")


def previous_checkpoint_path(path: Path) -> Path:
    """Where the checkpoint at ``path`` is moved while a new one is swapped in (``last.ckpt`` →
    ``last.tar-previous.ckpt``: still found by ``--ckpt_path last`` if a kill lands between the two renames)."""
    return path.with_name(f"{path.stem}{_PREVIOUS_TAG}{path.suffix}")


def _previous_target(path: Path) -> Optional[Path]:
    """The checkpoint path whose set-aside copy ``path`` is, or ``None``."""
    if path.stem.endswith(_PREVIOUS_TAG):
        return path.with_name(f"{path.stem[: -len(_PREVIOUS_TAG)]}{path.suffix}")
    return None


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def recover_interrupted_save(path: Path) -> Path:
    """Finish what a save to ``path`` killed mid-way left behind; returns the checkpoint path to use.

    A set-aside previous checkpoint is moved back when ``path`` is missing (the kill landed between the two
    renames), and deleted when ``path`` is there (the kill landed after the swap); a partial new checkpoint is
    deleted. ``path`` may also be the set-aside name itself (what ``--ckpt_path last`` finds in that window).
    Call on one process (global rank 0).
    """
    path = Path(path)
    target = _previous_target(path)
    if target is not None:  # the set-aside name: the checkpoint is the target (complete if there, else put back)
        path = target
    previous = previous_checkpoint_path(path)
    if previous.exists() or previous.is_symlink():
        if path.exists():
            remove_checkpoint_path(previous)
        else:
            _rename(previous, path)
            fsync_dir(path.parent)
    partial = partial_checkpoint_path(path)
    if partial.exists():
        remove_checkpoint_path(partial)
    return path


def _check_optimizer_state_loaded(path: Path, key: str, loaded: dict[str, Any]) -> None:
    """DCP loads only what the template asks for: an optimizer whose template lacks some of the checkpoint's
    per-parameter state (e.g. one that looked initialised) would resume with fresh moments, silently.

    Raises:
        ModelLoadError: naming the first entries of the checkpoint's optimizer state that were not loaded.
    """
    prefix = f"{key}.state."
    saved = {k[len(prefix):] for k in read_dcp_metadata(path).state_dict_metadata if k.startswith(prefix)}
    got = {f"{fqn}.{name}" for fqn, state in loaded.get("state", {}).items() for name in state}
    missing = sorted(saved - got)
    if missing:
        raise ModelLoadError(
            f"sharded checkpoint {str(path)!r}: {len(missing)} entries of the optimizer state ({key}) were not "
            f"loaded, e.g. {missing[:3]}: the optimizer does not match the one that wrote the checkpoint"
        )


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) with sharded checkpoints that are all-or-nothing and safe to
    load. Same arguments, plus ``check_finite``.

    Saving a sharded checkpoint to ``path`` (a folder): every rank writes its shard into a sibling folder
    ``.<name>.tar-partial``, then rank 0 renames the old ``path`` aside (``<stem>.tar-previous<suffix>``), renames
    the new folder in, flushes the parent folder and deletes the old one. A kill at any point leaves the old or the
    new complete checkpoint; the next save or load finishes the job (:func:`recover_interrupted_save`). A
    non-finite weight anywhere refuses the save on every rank (:class:`~tar_lightning.checkpoint.NonFiniteError`)
    before anything is written. Per-rank state under :data:`RANK_LOCAL_KEY` is saved as ``rank_local.<rank>.pt``.

    Loading reads DCP's ``.metadata`` with a restricted unpickler and its non-tensor items, ``meta.pt`` and the
    rank-local files with ``weights_only=True`` (:func:`tar_lightning.checkpoint.read_dcp_metadata`): a crafted
    checkpoint is refused with :class:`~tar_lightning.errors.ModelLoadError`, never executed.

    Removing (checkpoint rotation) deletes the folder (:func:`tar_lightning.checkpoint.remove_checkpoint_path`).
    """

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: Union[Literal["auto"], int] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.check_finite = check_finite

    # ----------------------------------------------------------------------------------------------- saving
    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective: every rank calls it)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return bool(t.item() > 0)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            if RANK_LOCAL_KEY in checkpoint and self.world_size > 1:
                raise ConfigError(
                    f"FSDP2Strategy(save_distributed_checkpoint=False) cannot keep the per-rank state under "
                    f"{RANK_LOCAL_KEY!r} of {self.world_size} ranks in one file: use save_distributed_checkpoint=True"
                )
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        path = Path(self.broadcast(str(filepath)))
        rank_local = checkpoint.pop(RANK_LOCAL_KEY, None)
        converted = {"state_dict": checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        bad = non_finite_entries(converted["state_dict"]) if self.check_finite else []
        if self._any_rank(bool(bad)):
            raise NonFiniteError(
                f"refusing to save checkpoint {str(path)!r}: NaN/Inf in the weights"
                + (f" (this rank: {bad[:3]})" if bad else " (on another rank)")
                + "; the previous checkpoint is kept (lower the learning rates or enable clipping)"
            )
        partial = partial_checkpoint_path(path)
        error: Optional[BaseException] = None
        if self.is_global_zero:
            try:
                recover_interrupted_save(path)
                partial.mkdir(parents=True)
            except OSError as e:
                error = e
        if not self._any_rank(error is not None):
            try:  # collective: every rank writes its shards, rank 0 the .metadata
                dcp_save(converted, storage_writer=FileSystemWriter(partial))
            except CheckpointException as e:
                error = e
            try:
                if error is None and rank_local is not None:
                    atomic_save(rank_local, partial / f"rank_local.{self.global_rank}.pt")
                if error is None and self.is_global_zero:
                    atomic_save(checkpoint, partial / _METADATA_FILENAME)
            except (OSError, RuntimeError) as e:
                error = e
        if self._any_rank(error is not None):  # all ranks wrote, or none swaps
            if self.is_global_zero:
                remove_checkpoint_path(partial)
            raise CheckpointWriteError(
                f"cannot write sharded checkpoint {str(path)!r}: "
                + (f"{type(error).__name__}: {error}" if error is not None else "another rank failed")
                + "; the previous checkpoint there is unchanged"
            ) from error
        swap_error: Optional[OSError] = None
        if self.is_global_zero:
            try:
                self._swap_in(partial, path)
            except OSError as e:
                swap_error = e
        if self._any_rank(swap_error is not None):  # also the barrier: nobody reads `path` before the swap
            raise CheckpointWriteError(
                f"cannot move the new sharded checkpoint into {str(path)!r}: "
                + (f"{type(swap_error).__name__}: {swap_error}" if swap_error is not None else "rank 0 failed")
                + "; the previous checkpoint is kept (put back, if set aside, at the next save or load)"
            ) from swap_error

    @staticmethod
    def _swap_in(partial: Path, path: Path) -> None:
        """Replace ``path`` with the complete new checkpoint ``partial`` (rank 0): old aside, new in, old deleted."""

        previous = previous_checkpoint_path(path)
        had_old = path.exists() or path.is_symlink()
        if had_old:
            _rename(path, previous)
        _rename(partial, path)
        fsync_dir(path.parent)
        if had_old:
            remove_checkpoint_path(previous)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete a checkpoint file or sharded folder (rank 0), whatever ``CheckpointIO`` plugin is configured."""
        if self.is_global_zero:
            remove_checkpoint_path(filepath)

    # ---------------------------------------------------------------------------------------------- loading
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a sharded folder (safely, see the class) or a single ``.ckpt`` file (``weights_only=True``)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.is_global_zero:
            path = recover_interrupted_save(path)
        path = Path(self.broadcast(str(path)))
        self.barrier("tar_lightning.FSDP2Strategy.load_checkpoint")
        if not _is_sharded_checkpoint(path):
            # a single file: Lightning's loader with torch.load(weights_only=True); never unpickle objects
            return super().load_checkpoint(path, weights_only=True)
        return self._load_sharded(path)

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        module = self.model
        assert module is not None and self.lightning_module is not None
        meta_file = path / _METADATA_FILENAME
        if not meta_file.is_file():
            raise ModelLoadError(f"sharded checkpoint {str(path)!r} has no {_METADATA_FILENAME} (incomplete)")
        with reraise_dcp_errors(path):
            module_state = {"state_dict": get_model_state_dict(module)}
            dcp_load(module_state, storage_reader=safe_dcp_reader(path), planner=safe_load_planner())
            module.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
            for idx, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{idx}"
                optim_state = {key: get_optimizer_state_dict(module, optimizer)}
                dcp_load(optim_state, storage_reader=safe_dcp_reader(path), planner=safe_load_planner())
                _check_optimizer_state_loaded(path, key, optim_state[key])
                set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                         options=StateDictOptions(cpu_offload=True))
        checkpoint = load_checkpoint(meta_file)
        local_files = sorted(path.glob("rank_local.*.pt"))
        if local_files:
            if len(local_files) != self.world_size:
                raise ConfigError(
                    f"sharded checkpoint {str(path)!r} holds per-rank state of {len(local_files)} ranks "
                    f"(rank_local.*.pt), this run has {self.world_size}: resume with the same number of processes"
                )
            checkpoint[RANK_LOCAL_KEY] = load_checkpoint(path / f"rank_local.{self.global_rank}.pt")
        return checkpoint
