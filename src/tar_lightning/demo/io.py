"""The demo's small helpers: source fingerprints for stage keys, JSON files, torch threads and a quiet Lightning.

- :func:`source_fingerprint`: the hash of the source files of some of our modules (part of every stage's key,
  hashed by :func:`tar_lightning.common.config_hash`, so that a stage trained by other code is not reused);
- :func:`write_json` / :func:`read_json`: the stage and result files (written atomically; a missing or damaged
  file reads as ``None``, i.e. "not cached");
- :func:`torch_threads`: the demo's ``threads`` setting for the duration of a block;
- :func:`silence_lightning` / :func:`quiet_lightning`: drop Lightning's start-up chatter and the warnings in
  :data:`HARMLESS_WARNINGS`, for good (worker processes) or for a block.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from tar_lightning.checkpoint import atomic_write_text
from tar_lightning.common import json_default
from tar_lightning.errors import ConfigError

__all__ = [
    "HARMLESS_WARNINGS",
    "quiet_lightning",
    "read_json",
    "silence_lightning",
    "source_files",
    "source_fingerprint",
    "torch_threads",
    "write_json",
]


def source_files(module_name: str) -> list[Path]:
    """The source files of a module (its ``__file__``) or package (every ``*.py`` file under its folder,
    subpackages included, sorted).

    The module is taken from ``sys.modules`` (imported if it is not yet), and its files are found through its
    ``__file__``: the code that runs, wherever the library is installed (a checkout or a wheel).

    Raises:
        ConfigError: the module cannot be imported or has no source file.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"demo: cannot fingerprint module {module_name!r}: {err}") from err
    file = getattr(module, "__file__", None)
    if not file or not Path(file).is_file():
        raise ConfigError(f"demo: module {module_name!r} has no source file to fingerprint (__file__={file!r})")
    path = Path(file)
    if hasattr(module, "__path__"):  # a package: everything under its folder
        return sorted(path.parent.rglob("*.py"))
    return [path]


def source_fingerprint(module_names: Sequence[str]) -> str:
    """20 hex digits of the SHA-256 of the source bytes of ``module_names`` (see :func:`source_files`): each
    module's name, and each file's path relative to its module's folder and its bytes. Any edit of those files,
    a comment included, changes it; the folder the library is installed in does not.

    Raises:
        ConfigError: a module without source files.
    """
    digest = hashlib.sha256()
    for name in module_names:
        files = source_files(name)
        root = Path(importlib.import_module(name).__file__).parent  # the package's folder, or the module's
        digest.update(f"module {name}\n".encode())
        for path in files:
            data = path.read_bytes()
            digest.update(f"file {path.relative_to(root).as_posix()} {len(data)}\n".encode())
            digest.update(data)
    return digest.hexdigest()[:20]


def write_json(path: Path, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically (other values by :func:`~tar_lightning.common.json_default`,
    the coercer of the configuration hash: a value with no stable JSON form is a ``TypeError``, not its ``str``)."""
    atomic_write_text(path, json.dumps(value, indent=1, default=json_default), what="demo file")


def read_json(path: Path) -> Optional[dict]:
    """The JSON in ``path``, or ``None`` when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (``None``: unchanged), the previous count after it."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


#: Lightning messages that say nothing about a single-process CPU demo (our own warnings still show).
HARMLESS_WARNINGS = (
    r"The `srun` command is available on your system but is not used",  # the demo is one process by design
    r".*isinstance\(treespec, LeafSpec\)",  # a deprecation inside Lightning itself
    r"Total length of `.*` across ranks is zero",  # the streams' empty validation loader
)

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def silence_lightning() -> dict[str, int]:
    """Drops Lightning's start-up chatter (device lines, the logger tip) and the warnings in
    :data:`HARMLESS_WARNINGS`, for good (worker processes call this); returns the previous logger levels."""
    levels = {n: logging.getLogger(n).level for n in _LIGHTNING_LOGGERS}
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for n in _LIGHTNING_LOGGERS:
        logging.getLogger(n).setLevel(logging.WARNING)
    return levels


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """:func:`silence_lightning` for the duration of the block."""
    with warnings.catch_warnings():
        levels = silence_lightning()
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
