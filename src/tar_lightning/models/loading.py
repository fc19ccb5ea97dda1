"""Loading a model source: :func:`load_model` (hub ids, local folders, GGUF files, aliases, tiny models),
tokenizer loading, :func:`ensure_pad_token`, and :func:`model_from_checkpoint_metadata` (the architecture and
tokenizer a tar_lightning checkpoint describes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tar_lightning.errors import ConfigError, ModelLoadError
from tar_lightning.models.dtypes import dtype_name, resolve_dtype
from tar_lightning.models.gguf import alias_folder, from_gguf, gguf_tokenizer
from tar_lightning.models.sources import (
    LOAD_ERRORS,
    NO_HUB_KERNELS,
    TINY_SOURCES,
    ModelSource,
    classify_source,
    first_line,
    hub_message,
    hub_offline,
)
from tar_lightning.models.tiny import tiny_model, tiny_tokenizer

__all__ = ["ensure_pad_token", "load_model", "model_from_checkpoint_metadata"]

logger = logging.getLogger(__name__)

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
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, **NO_HUB_KERNELS)
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
        offline = hub_offline()
        if offline:
            kwargs["local_files_only"] = True
        target = ref
    try:
        return AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except LOAD_ERRORS as err:
        if kind == "local":
            raise ModelLoadError(
                f"cannot load a causal LM from the folder {target!r}: {first_line(err)}"
            ) from err
        raise ModelLoadError(hub_message(ref, "model", err)) from err


def _load_tokenizer(ref: str, trust_remote_code: bool, *, own: bool):
    """Load a tokenizer from any kind of source. ``own``: the model's own source (affects the hint)."""
    kind = classify_source(ref)
    if kind == "tiny":
        return tiny_tokenizer()
    if kind == "gguf":
        return gguf_tokenizer(Path(os.path.expanduser(ref)), trust_remote_code)
    hint = " (set ModelSource.tokenizer to load the tokenizer from elsewhere)" if own else ""
    if kind == "alias":
        target, local = str(alias_folder(ref)), True
    elif kind == "local":
        path = _local_path(ref, "tokenizer")
        gguf = _single_gguf(path) if path.is_dir() else None
        if gguf is not None:
            return gguf_tokenizer(gguf, trust_remote_code)
        target, local = str(path), True
    else:
        target, local = ref, hub_offline()
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code, local_files_only=local)
    except LOAD_ERRORS as err:
        if kind == "hub":
            raise ModelLoadError(hub_message(ref, "tokenizer", err) + hint) from err
        raise ModelLoadError(
            f"cannot load a tokenizer from {target!r}: {first_line(err)}; the folder may lack tokenizer files"
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
        kwargs = dict(kwargs, dtype=dtype_name(resolve_dtype(dtype)))
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
        folder = alias_folder(spec.source)
        model = _from_pretrained(str(folder), "local", torch_dtype, trust_remote_code=False)
        if tok is None:
            tok = _load_tokenizer(str(folder), False, own=True)
    elif kind == "gguf":
        path = Path(os.path.expanduser(spec.source))
        model = from_gguf(path, torch_dtype)
        if tok is None:
            tok = gguf_tokenizer(path, spec.trust_remote_code)
    else:
        gguf = None
        if kind == "local":
            path = _local_path(spec.source, "model")
            gguf = _single_gguf(path) if path.is_dir() else None
        if gguf is not None:
            model = from_gguf(gguf, torch_dtype)
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
    if not isinstance(meta, Mapping) or not isinstance(meta.get("hf_config"), Mapping):
        raise ModelLoadError(
            f"checkpoint {where!r} was not written by a tar_lightning module (no 'tar_lightning' metadata with the "
            "model's config): pass the model to load it into"
        )
    hf_config = dict(meta["hf_config"])
    try:
        config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        model = AutoModelForCausalLM.from_config(config)
    except LOAD_ERRORS as err:
        raise ModelLoadError(f"checkpoint {where!r}: cannot build its model from its config: {first_line(err)}") from err
    model.eval()
    tokenizer = None
    files = meta.get("tokenizer_files")
    if files:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / Path(name).name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    return model, tokenizer
