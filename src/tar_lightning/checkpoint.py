"""Reliable checkpoints: atomic writes, no non-finite weights, no unpickling of arbitrary objects.

Lightning's default :class:`~lightning.fabric.plugins.io.TorchCheckpointIO` writes checkpoints in place: a job
killed (or a disk filling up) while ``last.ckpt`` is being written leaves a truncated file and no good
checkpoint. :class:`AtomicCheckpointIO` writes to a temporary file in the same folder, flushes it to disk and
renames it over the target (``os.replace``, atomic on POSIX): the previous checkpoint stays intact and readable
until the new one is complete. The ``tar-lightning`` CLI uses it by default; with a plain ``Trainer`` pass
``plugins=tar_trainer_plugins()`` (or ``plugins=[AtomicCheckpointIO()]``).

Loading uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain containers only, and a file
that would need arbitrary Python objects unpickled is refused with :class:`~tar_lightning.errors.ModelLoadError`.
Sharded (FSDP2) checkpoints are folders written by ``torch.distributed.checkpoint`` (DCP), whose ``.metadata`` file
is a pickle: :func:`read_dcp_metadata` reads it with an unpickler that accepts only DCP's own metadata classes and
the few torch types they hold (:data:`DCP_METADATA_GLOBALS`), and :func:`safe_load_planner` reads DCP's non-tensor
items with ``weights_only=True`` (torch's default planner unpickles them unrestricted).
:func:`read_checkpoint` reads either kind of checkpoint (a ``.ckpt`` file, or a sharded folder consolidated in one
process) as one dict on the CPU; :func:`tokenizer_files` is the tokenizer copy a module stores inside its
checkpoints (what ``tar-lightning export`` and ``load_from_checkpoint`` rebuild the tokenizer from).

Everything written here (and by the other writers of the library, through :func:`atomic_write`) gets the
permissions of an ordinary file or folder under the process umask (``0644``/``0755`` under the usual ``022``),
not the private ``0600``/``0700`` of ``tempfile.mkstemp``/``mkdtemp``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Optional

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from tar_lightning.errors import (
    CheckpointWriteError,
    ConfigError,
    ModelLoadError,
    NonFiniteError,
    TARLightningError,
)

__all__ = [
    "DCP_METADATA_GLOBALS",
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "NonFiniteError",
    "apply_umask",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_finite",
    "fsync_dir",
    "is_sharded_checkpoint",
    "load_sharded_state",
    "load_checkpoint",
    "process_umask",
    "read_checkpoint",
    "read_dcp_metadata",
    "remove_checkpoint_path",
    "reraise_dcp_errors",
    "safe_dcp_reader",
    "safe_load_planner",
    "tar_trainer_plugins",
    "tokenizer_files",
]


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


def process_umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows; else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, *, recursive: bool = False) -> None:
    """Give ``path`` the mode an ordinary ``open``/``mkdir`` would: ``0o666`` (files) or ``0o777`` (folders) minus
    the process umask. For what ``tempfile.mkstemp``/``mkdtemp`` created (always ``0600``/``0700``), and with
    ``recursive`` for a folder filled by libraries that write through such temporary files."""
    umask = process_umask()
    paths = [Path(path)]
    if recursive and paths[0].is_dir():
        paths += [p for p in paths[0].rglob("*") if not p.is_symlink()]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, fsync: bool = True, what: str = "file"
) -> Path:
    """Write ``path`` through ``write(binary file)`` into a temporary file in the same folder, then rename it over
    ``path`` (atomic on POSIX). The file gets the umask's permissions (``0644`` under ``022``).

    Raises:
        CheckpointWriteError: naming ``what``, the path and the cause (e.g. ``No space left on device``; a
            ``RuntimeError`` or pickling error from ``write``); the temporary file is removed and whatever was at
            ``path`` before is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {what} {str(path)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~process_umask())  # mkstemp's 0600 -> what open() would give
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(
                f"cannot write {what} {str(path)!r}: {e.strerror or e}; the previous file there is unchanged"
            ) from e
        if isinstance(e, (RuntimeError, pickle.PicklingError)) and not isinstance(e, TARLightningError):
            raise CheckpointWriteError(
                f"cannot write {what} {str(path)!r}: {e}; the previous file there is unchanged"
            ) from e
        raise
    if fsync:  # make the rename itself durable
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True, what: str = "file") -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), fsync=fsync, what=what)


def atomic_save(obj: Any, path: str | os.PathLike, *, fsync: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder and an atomic rename.

    Raises:
        CheckpointWriteError: naming the path and the cause (e.g. ``No space left on device``); the temporary
            file is removed and whatever was at ``path`` before is untouched.
    """
    return atomic_write(path, lambda fh: torch.save(obj, fh), fsync=fsync, what="checkpoint")


# What a sharded checkpoint folder may hold, and so what remove_checkpoint_path deletes without asking.
_SHARDED_ENTRY_SUFFIXES = (".distcp", ".pt", ".tmp")
_SHARDED_ENTRY_NAMES = (".metadata", ".metadata.tmp")


def _is_checkpoint_folder(path: Path) -> bool:
    entries = list(path.iterdir())
    if (path / ".metadata").is_file() or (path / "meta.pt").is_file():
        return True
    return all(e.is_file() and (e.name in _SHARDED_ENTRY_NAMES or e.name.endswith(_SHARDED_ENTRY_SUFFIXES))
               for e in entries)


def remove_checkpoint_path(path: str | os.PathLike) -> None:
    """Delete a checkpoint: a ``.ckpt`` file, or a sharded (FSDP2) checkpoint folder with its shards.

    A missing path is fine (already removed). A folder is removed only when it is a checkpoint folder (``.metadata``
    or ``meta.pt`` in it, or nothing but shard files): anything else there is not ours to delete.

    Raises:
        CheckpointWriteError: a folder that is not a checkpoint, or a removal that failed.
    """
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            if not _is_checkpoint_folder(path):
                raise CheckpointWriteError(
                    f"refusing to remove {str(path)!r}: a folder that is not a sharded checkpoint (no .metadata or "
                    "meta.pt, and entries other than shard files)"
                )
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except CheckpointWriteError:
        raise
    except OSError as e:
        raise CheckpointWriteError(f"cannot remove checkpoint {str(path)!r}: {e.strerror or e}") from e


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (never unpickles arbitrary objects).

    Raises:
        ModelLoadError: a missing file, or one that is truncated, corrupted, or holds arbitrary Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist or is not a file")
    return _load_weights_only(path, f"checkpoint {str(path)!r}", "truncated, corrupted", map_location)


def _load_weights_only(src: Any, what: str, damage: str, map_location: Any = "cpu") -> Any:
    """``torch.load(src, weights_only=True)``; anything it refuses or cannot read as :class:`ModelLoadError`."""
    try:
        return torch.load(src, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{what} cannot be loaded safely (weights_only): {damage}, or holding arbitrary Python objects, which "
            f"are never unpickled ({first})"
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
        """Delete a checkpoint file or a sharded checkpoint folder (:func:`remove_checkpoint_path`)."""
        remove_checkpoint_path(path)


def tar_trainer_plugins() -> list[Any]:
    """The Trainer plugins tar_lightning recommends: ``[AtomicCheckpointIO()]`` (``Trainer(plugins=...)``)."""
    return [AtomicCheckpointIO()]


# ------------------------------------------------------------------------------------- sharded (DCP) checkpoints
_DCP_METADATA_CLASSES = frozenset({
    "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
    "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
})

#: The globals a DCP ``.metadata`` pickle may name (module → names; ``torch`` also takes any ``torch.dtype``
#: name): DCP's metadata dataclasses, the storage record of its file-system writer, ``torch.Size``, torch's
#: layout lookup (``torch.serialization._get_layout``, a dictionary lookup by name) and the path type of
#: ``StorageMeta.checkpoint_id``. This is what torch 2.4-2.13's ``FileSystemWriter`` writes; none of them runs
#: code beyond building plain data.
DCP_METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": _DCP_METADATA_CLASSES,
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath"}),
    "pathlib._local": frozenset({"Path", "PosixPath", "PurePosixPath"}),  # where Python >= 3.13 pickles them
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, resolving only :data:`DCP_METADATA_GLOBALS` (and torch dtypes)."""

    def __init__(self, fh: IO[bytes], path: str) -> None:
        super().__init__(fh)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ModelLoadError(
            f"sharded checkpoint metadata {self._path!r} refers to {module}.{name}, which is not one of "
            "torch.distributed.checkpoint's metadata types: refusing to unpickle it (a crafted .metadata can run "
            "code); only checkpoints written by torch.distributed.checkpoint are read"
        )


def read_dcp_metadata(path: str | os.PathLike) -> Any:
    """Read a DCP ``.metadata`` file (or the one in the checkpoint folder ``path``) with the restricted unpickler.

    Returns:
        the ``torch.distributed.checkpoint.metadata.Metadata`` object.

    Raises:
        ModelLoadError: a missing, truncated or corrupted file, a global outside :data:`DCP_METADATA_GLOBALS`
            (named in the message), or a pickle that is not DCP ``Metadata``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ".metadata"
    try:
        with open(path, "rb") as fh:
            metadata = _DCPMetadataUnpickler(fh, str(path)).load()
    except ModelLoadError:
        raise
    except FileNotFoundError as e:
        raise ModelLoadError(f"sharded checkpoint metadata {str(path)!r} does not exist") from e
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RuntimeError, ImportError) as e:
        raise ModelLoadError(
            f"sharded checkpoint metadata {str(path)!r} cannot be read: truncated or corrupted "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(metadata, Metadata):
        raise ModelLoadError(
            f"sharded checkpoint metadata {str(path)!r} holds a {type(metadata).__name__}, not "
            "torch.distributed.checkpoint's Metadata"
        )
    return metadata


def _load_bytes_weights_only(value: IO[bytes], what: str) -> Any:
    return _load_weights_only(value, f"sharded checkpoint: item {what!r}", "corrupted")


def check_storage_paths(metadata: Any, where: Any) -> None:
    """Every storage record of a DCP ``.metadata`` must name a plain file of the checkpoint folder itself.

    The reader opens ``folder / relative_path``: an absolute path or a ``..`` in a crafted ``.metadata`` would read
    any file of the host into a tensor (and an export would write it into the model's weights).

    Raises:
        ModelLoadError: naming the ``.metadata`` file and the offending path.
    """
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ModelLoadError(
                f"sharded checkpoint metadata {str(where)!r} points outside its folder ({name!r}): a storage file must "
                "be a plain file name in the checkpoint folder; refusing to read it"
            )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses :func:`read_dcp_metadata` (and
    :func:`check_storage_paths`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        metadata = read_dcp_metadata(path)
        check_storage_paths(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyBytes:
    # DefaultLoadPlanner.load_bytes unpickles non-tensor items with weights_only=False; same placement here
    def load_bytes(self, read_item: Any, value: IO[bytes]) -> None:
        fqn = read_item.dest_index.fqn
        obj = _load_bytes_weights_only(value, fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """``DefaultLoadPlanner`` loading non-tensor items with ``weights_only=True``."""


class SafeKeysLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """Builds the state dict from the metadata (one-process reads), non-tensor items ``weights_only``."""


def safe_dcp_reader(path: str | os.PathLike) -> Any:
    """A ``torch.distributed.checkpoint.FileSystemReader`` for ``path`` that reads ``.metadata`` with the
    restricted unpickler (:func:`read_dcp_metadata`)."""
    return SafeFileSystemReader(str(path))


def safe_load_planner(keys: Optional[set[str]] = None, *, from_metadata: bool = False) -> Any:
    """A DCP load planner that reads non-tensor items (optimizer hyperparameters, ...) with ``weights_only=True``.

    Args:
        keys: with ``from_metadata``, the top-level keys to read (default: all).
        from_metadata: build the state dict from the checkpoint's metadata (a one-process read of full tensors,
            ``_load_state_dict_from_keys``-style) instead of filling the caller's state dict in place.
    """
    return SafeKeysLoadPlanner(keys=keys) if from_metadata else SafeLoadPlanner()


def load_sharded_state(path: str | os.PathLike, keys: Optional[set[str]] = None) -> dict[str, Any]:
    """Read the entries ``keys`` (full tensors, CPU) of a sharded checkpoint folder in this one process, without a
    process group; ``.metadata`` and non-tensor items are read safely.

    Raises:
        ModelLoadError: unsafe or unreadable metadata/items, or missing shard files.
    """
    state: dict[str, Any] = {}
    with warnings.catch_warnings(), reraise_dcp_errors(path):
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process": it is
        _load_state_dict(state, storage_reader=safe_dcp_reader(path), no_dist=True,
                         planner=safe_load_planner(keys, from_metadata=True))
    return state


@contextlib.contextmanager
def reraise_dcp_errors(path: str | os.PathLike) -> Any:
    """Turn DCP's ``CheckpointException`` (a ``BaseException`` wrapping each rank's error) and read errors into
    :class:`ModelLoadError`; our own errors (e.g. a refused ``.metadata``) come out unchanged."""
    try:
        yield
    except ModelLoadError:
        raise
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        ours = next((c for c in causes if isinstance(c, TARLightningError)), None)
        if ours is not None:
            raise ours from e
        first = causes[0] if causes else e
        raise ModelLoadError(
            f"sharded checkpoint {str(path)!r} cannot be read: {type(first).__name__}: {first}"
        ) from e
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"sharded checkpoint {str(path)!r} cannot be read: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------- reading either kind, whole
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a distributed (sharded, FSDP2) checkpoint folder written by Lightning."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def _load_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one ``.ckpt``-style dict (full tensors, on the CPU).

    Nothing is unpickled beyond data: ``.metadata`` goes through the restricted unpickler, ``meta.pt`` and DCP's
    non-tensor items through ``weights_only`` loading.
    """
    meta_file = path / "meta.pt"
    if not meta_file.is_file():
        raise ModelLoadError(f"sharded checkpoint {str(path)!r} has no meta.pt (not written by Lightning's "
                             "ModelParallelStrategy, or incomplete)")
    keys = {k for k in read_dcp_metadata(path).state_dict_metadata if k.startswith(("state_dict.", "optimizer_0."))}
    ckpt = read_checkpoint(meta_file)
    loaded = load_sharded_state(path, keys)
    ckpt["state_dict"] = loaded.get("state_dict", {})
    optimizer = loaded.get("optimizer_0")
    if optimizer is not None:
        ckpt["optimizer_states"] = [_index_keyed(optimizer, ckpt["state_dict"], path)]
    return ckpt


def _index_keyed(optimizer: dict[str, Any], state_dict: dict[str, Any], path: Path) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (distributed checkpoints) as torch's index-keyed form, the
    indices being the order of the model's parameters (that of ``state_dict``, the module's own order)."""
    groups = optimizer.get("param_groups", [])
    names = [n for g in groups for n in g.get("params", [])]
    order = {n: i for i, n in enumerate(k for k in state_dict if k in set(names))}
    missing = [n for n in names if n not in order]
    if missing:
        raise ModelLoadError(f"sharded checkpoint {str(path)!r}: optimizer parameters {missing[:3]} are not in "
                             "its state_dict")
    return {
        "state": {order[n]: v for n, v in optimizer.get("state", {}).items() if n in order},
        "param_groups": [dict(g, params=[order[n] for n in g.get("params", [])]) for g in groups],
    }


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint as one dict on the CPU: a ``.ckpt`` file (``weights_only``), or a sharded FSDP2 checkpoint
    folder consolidated in this process (``.metadata`` read with the restricted unpickler).

    Raises:
        ConfigError / ModelLoadError: a missing, unreadable, unsafe or foreign checkpoint.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return _load_sharded_checkpoint(path)
        raise ConfigError(f"checkpoint {str(path)!r} is a folder but not a sharded (distributed) checkpoint: "
                          "expected a .ckpt file or a folder with .metadata, .distcp shards and meta.pt")
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist or is not a file")
    return load_checkpoint(path)  # tensors and plain containers only: never arbitrary objects


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files of ``tokenizer.save_pretrained`` as ``{name: bytes}`` (small; a module stores them inside its
    checkpoints under ``tar_lightning.tokenizer_files``, from which the tokenizer is rebuilt on export or reload)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
