"""Files shipped inside the package: the recipes, the red-team suites, the demo config, the callback overlays.

The repository's top-level ``recipes/`` and ``callbacks/`` folders are the only copy of these files; users
copy and edit them there. The build also installs them inside the package (``pyproject.toml``,
``[tool.setuptools.package-dir]``): ``recipes/`` as ``tar_lightning/recipes`` and ``callbacks/`` (its YAML
overlays; the Python callbacks are :mod:`tar_lightning.callbacks`) as ``tar_lightning/callback_overlays``. An
editable install maps the same package names onto the checkout's folders, so the library finds the files the
same way, through :mod:`importlib.resources`, whether it was installed from a wheel, a git URL or with
``pip install -e .``.

:func:`shipped` is the one way the library finds such a file; it takes the path as it is in the repository::

    from tar_lightning.resources import shipped, shipped_names

    shipped("recipes/demo/default.yaml")     # a pathlib.Path inside the installed package
    shipped("callbacks/retain_monitor.yaml")
    shipped_names("recipes/redteam")         # ['durability', 'refusal', ...]

To start a recipe of your own from an installed package, copy the file :func:`shipped` returns.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePosixPath

from tar_lightning.errors import ConfigError

__all__ = ["SHIPPED_FOLDERS", "shipped", "shipped_names"]

#: top-level folder of the repository -> the package it is installed as
SHIPPED_FOLDERS: dict[str, str] = {
    "recipes": "tar_lightning.recipes",
    "callbacks": "tar_lightning.callback_overlays",
}


def _parts(path: str) -> tuple[str, ...]:
    pure = PurePosixPath(str(path).replace("\\", "/"))
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if pure.is_absolute() or ".." in parts or not parts:
        raise ConfigError(
            f"shipped file {str(path)!r}: expected a path relative to the repository root, e.g. "
            "'recipes/demo/default.yaml'"
        )
    if parts[0] not in SHIPPED_FOLDERS:
        raise ConfigError(
            f"shipped file {str(path)!r}: {parts[0]!r} is not a shipped folder; shipped folders: "
            f"{sorted(SHIPPED_FOLDERS)}"
        )
    return parts


def _root(folder: str) -> Path:
    """The installed copy of a shipped top-level folder (``recipes`` or ``callbacks``), a folder on disk."""
    package = SHIPPED_FOLDERS[folder]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"shipped folder {folder}/: the package {package} is missing from this tar_lightning install "
            f"({err}); reinstall tar_lightning (pip install -e . in a checkout)"
        ) from err
    if not isinstance(root, Path):  # e.g. the package is imported from a zip archive
        raise ConfigError(
            f"shipped folder {folder}/: {root} is not a folder on disk; install tar_lightning unzipped"
        )
    return root


def _listing(folder: Path, top: str) -> list[str]:
    """What ``folder`` holds, as ``top/name`` (folders end in ``/``), sorted; packaging files left out."""
    return sorted(
        f"{top}/{p.name}" + ("/" if p.is_dir() else "")
        for p in folder.iterdir()
        if not p.name.startswith((".", "__"))
    )


def shipped(path: str) -> Path:
    """A file (or folder) shipped with the package, by its path in the repository.

    Args:
        path: relative to the repository root, starting with a shipped folder (``SHIPPED_FOLDERS``), e.g.
            ``"recipes/redteam/durability.yaml"`` or ``"callbacks/tamper_probe.yaml"``.

    Returns:
        Its installed copy (inside site-packages for a wheel; the checkout's file for an editable install).

    Raises:
        ConfigError: a path outside the shipped folders, or one that does not exist (naming it and listing
            what the deepest existing folder on its way holds).
    """
    parts = _parts(path)
    root = _root(parts[0])
    target = root.joinpath(*parts[1:])
    if target.exists():
        return target
    nearest, depth = root, 1
    while depth < len(parts) - 1 and (nearest / parts[depth]).is_dir():
        nearest, depth = nearest / parts[depth], depth + 1
    entries = _listing(nearest, "/".join(parts[:depth]))
    raise ConfigError(
        f"shipped file {'/'.join(parts)!r} does not exist in tar_lightning's shipped files ({root}); "
        f"{'/'.join(parts[:depth])}/ holds: {entries if entries else 'nothing'}"
    )


def shipped_names(folder: str, suffix: str = ".yaml") -> list[str]:
    """The names (``suffix`` removed) of the shipped files directly in ``folder``, sorted.

    Example: ``shipped_names("recipes/redteam")`` lists the shipped red-team suites.

    Raises:
        ConfigError: ``folder`` is not a shipped folder.
    """
    directory = shipped(folder)
    if not directory.is_dir():
        raise ConfigError(f"shipped path {folder!r} is a file, expected a folder")
    return sorted(
        p.name[: -len(suffix)] for p in directory.iterdir() if p.is_file() and p.name.endswith(suffix)
    )
