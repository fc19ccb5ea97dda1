"""Small rules shared by every layer of the library: number checks, "is this a local path", a model's fingerprint,
the JSON form of records and the hash that keys a configuration.

This module imports nothing from the rest of the library (only the standard library, numpy and torch), so any module can
use it without creating an import cycle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "LOCAL_FILE_SUFFIXES",
    "config_hash",
    "is_int",
    "is_number",
    "json_default",
    "looks_local",
    "model_fingerprint",
]


# ------------------------------------------------------------------------------------------------ numbers
def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` (``True``/``False`` are not, nor ``3.0``, ``"3"`` or numpy integers).

    Configuration values come from YAML, JSON or the command line, which give Python ints; they end up in JSON
    records and cache keys, where a numpy integer would not serialize the same way. A bool is refused because
    ``steps: true`` is a typo, not the number 1.
    """
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite Python ``int`` or ``float`` (not a bool, NaN, an infinity or a string).

    ``numpy.float64`` counts (it is a ``float``); other numpy scalars do not (see :func:`is_int`).
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------ paths
#: File types the library reads (data files, MCQ files, model weights): a name ending in one of them is a file.
LOCAL_FILE_SUFFIXES: tuple[str, ...] = (
    ".txt", ".json", ".jsonl", ".csv", ".parquet", ".gz",
    ".gguf", ".safetensors", ".bin", ".pt", ".ckpt",
)

# One part of a Hugging Face hub id (huggingface_hub's rule: letters, digits, "_", "-", "."; not starting with ".").
_HUB_PART = re.compile(r"[\w\-][\w\-.]*")


def looks_local(ref: str) -> bool:
    """Whether ``ref`` names a file or folder on this machine rather than a Hugging Face hub id.

    A hub id is ``name`` or ``org/name``, each part made of letters, digits, ``_``, ``-`` and ``.`` and not
    starting with ``.``. ``ref`` is local when any of these holds:

    - it starts with ``/``, ``.`` (``./x``, ``../x``, ``.hidden``) or ``~``, is absolute on this OS, or holds a
      backslash (a Windows path);
    - it exists (after ``~`` expansion): a local folder named like a hub id wins, as in ``transformers``;
    - it ends in a file type the library reads (:data:`LOCAL_FILE_SUFFIXES`, case-insensitive: ``data.jsonl``,
      ``x.csv.gz``, ``model.safetensors``): a hub id names a repository, never a file;
    - it has more than two ``/``-separated parts, an empty part (``a//b``, ``org/``) or a part a hub id cannot
      have (a space, ``:``, ...);
    - it is ``first/last`` where ``first`` is an existing folder (``outputs/run1`` before ``run1`` is written).

    Everything else (``gpt2``, ``cais/wmdp``, ``HuggingFaceTB/SmolLM2-135M``) is a hub id. Callers check this
    only for a reference that does not exist, to report "file not found" instead of a confusing hub error.
    """
    if ref.startswith(("/", ".", "~")) or "\\" in ref or os.path.isabs(ref):
        return True
    if os.path.exists(os.path.expanduser(ref)):
        return True
    if ref.lower().endswith(LOCAL_FILE_SUFFIXES):
        return True
    parts = ref.split("/")
    if len(parts) > 2 or not all(_HUB_PART.fullmatch(p) for p in parts):
        return True
    return len(parts) == 2 and os.path.isdir(parts[0])


# ------------------------------------------------------------------------------------------------ models
def model_fingerprint(model: nn.Module) -> str:
    """A digest of a module's class and of every parameter and buffer: name, shape, dtype and every byte of its
    values (24 hex characters of SHA-256).

    Two modules get the same fingerprint exactly when they hold the same tensors bit for bit, in any process and
    with any thread count (no floating-point reduction is involved); one changed element changes it. Integer
    tensors (packed quantized weights) count too; a tensor on the ``meta`` device contributes its name, shape and
    dtype only. Tensors are hashed one at a time (a GPU tensor is copied to the CPU one at a time); SHA-256 reads
    roughly 1 GB/s, a fraction of a second for a 135M model.

    Used to key what was computed from given weights: the red team's pre-attack evaluations and run records of
    an in-memory model, the demo evaluator's memo, the DPO reference log-prob cache.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, tensor in named:
                t = tensor.detach()
                h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
                if t.device.type == "meta" or not t.numel():
                    continue
                raw = t.reshape(-1).view(torch.uint8)  # the values' bytes, whatever the dtype
                h.update(raw.cpu().numpy().data)
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ JSON and hashes
def json_default(value: Any) -> Any:
    """The JSON form of what records hold besides JSON types: paths, numpy numbers, tuples, dataclasses.

    Anything else is a ``TypeError``: a key built from an object without a stable JSON form (its ``str`` may hold
    a memory address) would change from run to run.
    """
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def config_hash(value: Any) -> str:
    """20 hex digits of the SHA-256 of ``value``'s key-sorted JSON (:func:`json_default` for other values): the
    key of a red-team run's configuration and of every cached demo stage."""
    text = json.dumps(value, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
