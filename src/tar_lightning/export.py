"""Turning a training checkpoint into a Hugging Face folder (weights + config + tokenizer).

Both kinds of Lightning checkpoint are read: a ``.ckpt`` file (single device, DDP) and the sharded folder that
:class:`~tar_lightning.strategy.FSDP2Strategy` (or Lightning's ``ModelParallelStrategy``) writes under FSDP2 (one
``.distcp`` file per rank, ``.metadata`` and ``meta.pt``), which is consolidated here in one process, without a
process group: only the weights and the outer optimizer's state (needed to move schedule-free weights to their
evaluation point) are read. Nothing in either kind of checkpoint is unpickled beyond tensors and plain data
(:mod:`tar_lightning.checkpoint`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from tar_lightning.errors import ConfigError, ModelLoadError
from tar_lightning.models import export_pretrained

__all__ = ["checkpoint_to_model", "export_checkpoint", "is_sharded_checkpoint", "read_checkpoint", "tokenizer_files"]


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files of ``tokenizer.save_pretrained`` as ``{name: bytes}`` (small; stored inside checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed (sharded, FSDP2) checkpoint folder written by Lightning."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def _load_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one ``.ckpt``-style dict (full tensors, on the CPU).

    Nothing is unpickled beyond data: ``.metadata`` goes through the restricted unpickler, ``meta.pt`` and DCP's
    non-tensor items through ``weights_only`` loading (:mod:`tar_lightning.checkpoint`).
    """
    from tar_lightning.checkpoint import load_sharded_state, read_dcp_metadata

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
    from tar_lightning.checkpoint import load_checkpoint

    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return _load_sharded_checkpoint(path)
        raise ConfigError(f"checkpoint {str(path)!r} is a folder but not a sharded (distributed) checkpoint: "
                          "expected a .ckpt file or a folder with .metadata, .distcp shards and meta.pt")
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist or is not a file")
    return load_checkpoint(path)  # tensors and plain containers only: never arbitrary objects


def _to_eval_point(model: torch.nn.Module, optimizer_state: dict[str, Any]) -> None:
    """Move schedule-free training-point weights y to the evaluation point x, as the optimizer's ``eval()``."""
    import schedulefree

    params = [p for p in model.parameters() if p.requires_grad]
    opt = schedulefree.AdamWScheduleFree(params, lr=1.0)
    try:
        opt.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"the checkpoint's schedule-free optimizer state does not match the model: {e}") from e
    opt.eval()


def load_tokenizer(source: str):
    """The tokenizer of a model source (tiny aliases included), without loading the model's weights."""
    from transformers import AutoTokenizer

    from tar_lightning.models import tiny_tokenizer

    if source.startswith("tiny"):
        return tiny_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}: {e}") from e


def checkpoint_to_model(ckpt_path: str | Path, tokenizer_source: Optional[str] = None):
    """Rebuild ``(model, tokenizer)`` from a tar_lightning checkpoint, weights at their evaluation point.

    Args:
        ckpt_path: a ``.ckpt`` written by ``Trainer.fit`` with a tar_lightning module, or the sharded checkpoint
            folder written under FSDP2 (``ModelParallelStrategy``), consolidated here.
        tokenizer_source: load the tokenizer from here instead of the copy inside the checkpoint.

    Raises:
        ConfigError / ModelLoadError: missing, unreadable or foreign checkpoints.
    """
    from tar_lightning.models import model_from_checkpoint_metadata

    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    meta = ckpt.get("tar_lightning")
    model, tokenizer = model_from_checkpoint_metadata(meta, str(path))
    prefix = meta.get("model_prefix", "model.")
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} does not match its own model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for opt_state in ckpt.get("optimizer_states", []):
        groups = opt_state.get("param_groups", [])
        if groups and all(g.get("train_mode") for g in groups):
            _to_eval_point(model, opt_state)
    if tokenizer_source is not None:
        tokenizer = load_tokenizer(tokenizer_source)
    elif tokenizer is None:
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no tokenizer; pass --tokenizer SOURCE")
    return model, tokenizer


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer_source: Optional[str] = None,
    dtype: Optional[str] = None,
) -> Path:
    """Write a checkpoint as an HF folder (model + tokenizer), atomically; returns the folder."""
    from tar_lightning.models import resolve_dtype

    model, tokenizer = checkpoint_to_model(ckpt_path, tokenizer_source)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    export_pretrained(model, tokenizer, out_dir, overwrite=overwrite)
    return Path(out_dir)
