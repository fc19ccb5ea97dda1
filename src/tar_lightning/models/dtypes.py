"""Model dtypes: the names a recipe may give (``float32``, ``bf16``, ...) and the ``torch.dtype`` each means."""

from __future__ import annotations

import torch

from tar_lightning.errors import ConfigError

__all__ = ["dtype_name", "resolve_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """Turn a dtype name into a ``torch.dtype``.

    Args:
        name: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (also ``fp32``/``bf16``/``fp16``/``half`` and the
            ``torch.`` prefixed spellings), one of those ``torch.dtype`` objects, or ``None`` for float32.

    Returns:
        The dtype.

    Raises:
        ConfigError: any other value; the message lists the valid names.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise ConfigError(f"dtype {name} is not supported for models; expected one of {sorted(_DTYPES)}")
    if isinstance(name, str):
        key = name.strip().lower().removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name (``"float32"``, ``"bfloat16"``, ``"float16"``) of a dtype :func:`resolve_dtype` returns."""
    return next(k for k, v in _DTYPES.items() if v == dtype)
