"""Reliable checkpoints: atomic writes, no non-finite weights, no unpickling of arbitrary objects.

Lightning's default :class:`~lightning.fabric.plugins.io.TorchCheckpointIO` writes checkpoints in place: a job
killed (or a disk filling up) while ``last.ckpt`` is being written leaves a truncated file and no good
checkpoint. :class:`AtomicCheckpointIO` writes to a temporary file in the same folder, flushes it to disk and
renames it over the target (``os.replace``, atomic on POSIX): the previous checkpoint stays intact and readable
until the new one is complete. The ``tar-lightning`` CLI uses it by default; with a plain ``Trainer`` pass
``plugins=tar_trainer_plugins()`` (or ``plugins=[AtomicCheckpointIO()]``).

Loading uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain containers only, and a file
that would need arbitrary Python objects unpickled is refused with :class:`~tar_lightning.errors.ModelLoadError`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from tar_lightning.errors import ModelLoadError, TARLightningError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "NonFiniteError",
    "atomic_save",
    "check_finite",
    "load_checkpoint",
    "tar_trainer_plugins",
]


class CheckpointWriteError(TARLightningError, OSError):
    """A checkpoint could not be written (the previous file at that path is left untouched)."""


class NonFiniteError(TARLightningError, RuntimeError):
    """Training produced NaN/Inf: too many skipped outer steps in a row, or non-finite weights to save."""


def non_finite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold a NaN or an Inf."""
    bad: list[str] = []
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            local = state.to_local() if hasattr(state, "to_local") else state
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad.append(prefix or "<tensor>")
    elif isinstance(state, Mapping):
        for key, value in state.items():
            bad.extend(non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            bad.extend(non_finite_entries(value, f"{prefix}[{i}]"))
    return bad


def check_finite(state_dict: Mapping[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the entries of ``state_dict`` that hold NaN/Inf."""
    bad = non_finite_entries(state_dict)
    if bad:
        raise NonFiniteError(
            f"refusing to save {what}: {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[:3]}; the previous checkpoint "
            "is kept (lower the learning rates or enable clipping)"
        )


def atomic_save(obj: Any, path: str | os.PathLike, *, fsync: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder and an atomic rename.

    Raises:
        CheckpointWriteError: naming the path and the cause (e.g. ``No space left on device``); the temporary
            file is removed and whatever was at ``path`` before is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {str(path)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(
                f"cannot write checkpoint {str(path)!r}: {e.strerror or e}; the previous file there is unchanged"
            ) from e
        if isinstance(e, (RuntimeError, pickle.PicklingError)) and not isinstance(e, TARLightningError):
            raise CheckpointWriteError(
                f"cannot write checkpoint {str(path)!r}: {e}; the previous file there is unchanged"
            ) from e
        raise
    if fsync:  # make the rename itself durable
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (never unpickles arbitrary objects).

    Raises:
        ModelLoadError: a missing file, or one that is truncated, corrupted, or holds arbitrary Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"checkpoint {str(path)!r} cannot be loaded safely (weights_only): truncated, corrupted, or holding "
            f"arbitrary Python objects, which are never unpickled ({first})"
        ) from e


class AtomicCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that writes checkpoints atomically and never writes non-finite weights.

    Args:
        fsync: flush file and directory to disk before reporting success (safe against power loss).
        check_finite: refuse (:class:`NonFiniteError`) to save a checkpoint whose ``state_dict`` holds NaN/Inf.
    """

    def __init__(self, fsync: bool = True, check_finite: bool = True) -> None:
        self.fsync = fsync
        self.check_finite = check_finite

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}")
        if self.check_finite and "state_dict" in checkpoint:
            check_finite(checkpoint["state_dict"], f"checkpoint {str(path)!r}")
        atomic_save(checkpoint, path, fsync=self.fsync)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def tar_trainer_plugins() -> list[Any]:
    """The Trainer plugins tar_lightning recommends: ``[AtomicCheckpointIO()]`` (``Trainer(plugins=...)``)."""
    return [AtomicCheckpointIO()]
