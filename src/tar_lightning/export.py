"""Turning a training checkpoint into a Hugging Face folder (weights + config + tokenizer)."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from tar_lightning.errors import ConfigError, ModelLoadError
from tar_lightning.models import export_pretrained

__all__ = ["checkpoint_to_model", "export_checkpoint", "tokenizer_files"]


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files of ``tokenizer.save_pretrained`` as ``{name: bytes}`` (small; stored inside checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        # Our checkpoints hold only tensors and plain containers: never unpickle arbitrary objects.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} cannot be read as a tar_lightning checkpoint with weights_only loading "
            f"(truncated, corrupted, or holding arbitrary Python objects): {e}"
        ) from e


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
        ckpt_path: a ``.ckpt`` written by ``Trainer.fit`` with a tar_lightning module.
        tokenizer_source: load the tokenizer from here instead of the copy inside the checkpoint.

    Raises:
        ConfigError / ModelLoadError: missing, unreadable or foreign checkpoints.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(ckpt_path)
    ckpt = _load_checkpoint(path)
    meta = ckpt.get("tar_lightning")
    if not isinstance(meta, dict) or "hf_config" not in meta:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} was not written by a tar_lightning module (no 'tar_lightning' metadata)"
        )
    hf_config = dict(meta["hf_config"])
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    model = AutoModelForCausalLM.from_config(config)
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
    elif meta.get("tokenizer_files"):
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in meta["tokenizer_files"].items():
                (Path(tmp) / name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    else:
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
