"""Saving a model and its tokenizer as a Hugging Face folder, atomically: :func:`export_pretrained`."""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tar_lightning.checkpoint import apply_umask
from tar_lightning.errors import ConfigError, ExportError, TARLightningError
from tar_lightning.models.gguf import clear_gguf_marks, install_dir
from tar_lightning.models.sources import first_line

__all__ = ["export_pretrained"]

logger = logging.getLogger(__name__)

def _non_finite(model: nn.Module) -> list[str]:
    bad = []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        data = tensor.detach()
        if hasattr(data, "full_tensor"):  # DTensor (FSDP2): check the whole tensor
            data = data.full_tensor()
        if data.device.type == "meta":
            continue
        if not bool(torch.isfinite(data).all()):
            bad.append(name)
    return bad


def export_pretrained(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    safe_serialization: bool = True,
) -> Path:
    """Save ``model`` and ``tokenizer`` with ``save_pretrained`` into ``out_dir``, atomically.

    Everything is written to a temporary folder next to ``out_dir`` and renamed into place once complete, so
    ``out_dir`` is never left half-written; with ``overwrite`` an existing ``out_dir`` is replaced only after
    the new folder is complete. The config is saved with ``use_cache`` on (for inference); the in-memory
    model is unchanged. A model loaded from a GGUF file is saved as plain (dequantized) weights.

    Args:
        model: a Hugging Face ``PreTrainedModel``.
        tokenizer: its tokenizer (``None`` saves the model only).
        out_dir: the folder to create.
        overwrite: replace ``out_dir`` if it exists.
        safe_serialization: write safetensors (transformers >= 5 always does; ``False`` is then ignored).

    Returns:
        The absolute path of ``out_dir``.

    Raises:
        ConfigError: ``out_dir`` exists and ``overwrite`` is false, or it exists and is not a folder.
        ExportError: weights or buffers hold NaN/Inf (nothing is written), or saving fails.
    """
    out = Path(os.path.expanduser(os.fspath(out_dir))).absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"export: {str(out)!r} exists and is not a folder")
        if not overwrite:
            raise ConfigError(f"export: output folder {str(out)!r} already exists; pass overwrite=True to replace it")
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"export: {type(model).__name__} is not a Hugging Face model (no save_pretrained)")
    bad = _non_finite(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ExportError(f"refusing to export to {str(out)!r}: non-finite (NaN/Inf) values in {shown}")
    clear_gguf_marks(model)

    save_kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = safe_serialization
    elif not safe_serialization:
        logger.warning("this transformers version always writes safetensors; safe_serialization=False ignored")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise ExportError(f"export: cannot create a folder next to {str(out)!r}: {err}") from err
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = True
        try:
            model.save_pretrained(str(tmp), **save_kwargs)
        finally:
            if use_cache is not None:
                config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        apply_umask(tmp, recursive=True)  # mkdtemp/safetensors write private (0700/0600) entries
        install_dir(tmp, out)
    except TARLightningError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"export to {str(out)!r} failed: {first_line(err)}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s", type(model).__name__, out)
    return out
