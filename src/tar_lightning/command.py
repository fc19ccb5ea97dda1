"""The command line of ``demo``, ``redteam``, ``evaluate`` and ``export``: one way to give options.

``fit`` and ``validate`` go through LightningCLI (``tar_lightning.cli``); the other subcommands are described by a
dataclass of options and parsed here, with the same surface:

- ``--config FILE`` (repeatable): a YAML mapping of options; files merge in order, mappings key by key;
- ``--KEY VALUE`` / ``--KEY=VALUE``, and ``--SECTION.KEY VALUE`` for a nested option (the demo's
  ``--tar.outer_steps 5``): later wins over earlier, flags over files. A value is read as YAML (``3``, ``0.1``,
  ``[w01, w02]``, ``null``) except for a text option, which takes it verbatim. A true/false option given without
  a value is true (``--overwrite``);
- ``--print_config``: print the resolved options as YAML and exit; the output is a valid ``--config`` file;
- ``-h`` / ``--help``.

Every value is checked by the one coercion (:func:`tar_lightning.schema.from_mapping`), so a wrong type or an
unknown key names the option. The hyphenated flags of 0.1 (``--max-steps``, ``--no-progress``,
``--data REGIME=PATH``) keep working until 0.3 with a ``FutureWarning`` naming the new spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from tar_lightning.errors import ConfigError
from tar_lightning.schema import deep_merge, from_mapping

__all__ = ["Command", "Deprecated", "Parsed", "merge_layers", "name_list", "sources_label", "options_yaml", "parse_command", "read_config"]

REMOVED_IN = "0.3"


def name_list(value: Any, where: str) -> Optional[list[str]]:
    """Field converter (``metadata={"coerce": name_list}``) of an option listing names: a YAML list
    (``[w01, w02]``) or one comma-separated string (``w01,w02``, the 0.1 spelling); ``None`` or empty: ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of names or a comma-separated string, got {value!r}")
    names = [v.strip() for v in value if v.strip()]
    return names or None


@dataclass(frozen=True)
class Deprecated:
    """An old flag and what it means now.

    Attributes:
        key: the option it sets (dotted).
        value: the value it sets when it takes none (``--no-progress`` sets ``progress`` to ``False``);
            ``None``: it takes the next argument.
        mapping: the flag takes ``NAME=VALUE`` and sets ``<key>.NAME`` (``--data forget=x.jsonl``).
    """

    key: str
    value: Any = None
    mapping: bool = False


@dataclass
class Command:
    """A subcommand parsed by :func:`parse_command`.

    Attributes:
        name: the subcommand (``redteam``).
        description: one paragraph for ``--help``.
        options: the dataclass whose fields are the options; a field's ``metadata["help"]`` is its help line.
        deprecated: old flag (``--max-steps``) -> what it sets.
        resolve: builds the options object from the ``--config`` layers (``[(file, mapping), ...]`` in order,
            ``base`` first) and the merged flags (the demo puts its size preset between its full files and the
            rest); default: ``from_mapping(options, deep_merge(<layers merged>, flags))``.
        base: a YAML file read as the first layer (the demo's shipped configuration), or ``None``.
        notes: extra lines at the end of ``--help``.
    """

    name: str
    description: str
    options: type
    deprecated: Mapping[str, Deprecated] = field(default_factory=dict)
    resolve: Optional[Callable[[list[tuple[Path, dict]], dict], Any]] = None
    base: Optional[Path] = None
    notes: Sequence[str] = ()

    @property
    def prog(self) -> str:
        return f"tar-lightning {self.name}"

    def build(self, layers: list[tuple[Path, dict]], flags: dict) -> Any:
        if self.resolve is not None:
            return self.resolve(layers, flags)
        return from_mapping(self.options, deep_merge(merge_layers(layers), flags), sources_label(layers, flags))


@dataclass
class Parsed:
    """The outcome of :func:`parse_command`: the options, or ``exit_code`` when ``--help`` or ``--print_config``
    already did the work."""

    options: Any = None
    exit_code: Optional[int] = None


def parse_command(command: Command, argv: Sequence[str]) -> Parsed:
    """Parses ``argv`` (the arguments after the subcommand) into ``command.options``.

    Raises:
        ConfigError: an unknown option (with the closest valid one), a missing value, an unreadable or non-mapping
            ``--config`` file, or a value the options dataclass refuses.
    """
    layers: list[tuple[Path, dict]] = []
    if command.base is not None:
        layers.append((command.base, read_config(command.base)))
    flags: dict = {}
    print_config = False
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token in ("-h", "--help"):
            print(help_text(command))
            return Parsed(exit_code=0)
        if token == "--print_config":
            print_config = True
            continue
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; options are given as --KEY VALUE "
                              f"({command.prog} --help)")
        name, eq, inline = token[2:].partition("=")
        value: Optional[str] = inline if eq else None
        old = command.deprecated.get(f"--{name}")
        if old is not None and old.mapping:  # "--data {forget: x}" is the current option; "--data forget=x" the old
            text = value if value is not None else (args[i] if i < len(args) else "")
            if text.lstrip().startswith("{") or "=" not in text:
                old = None
        if old is not None:
            name, value, i = _deprecated(command, f"--{name}", old, value, args, i)
            if name is None:  # a NAME=VALUE flag: VALUE is a path, or a YAML mapping when it starts with "{"
                key, text = value
                _set(flags, key, _yaml_value(text) if text.lstrip().startswith("{") else text)
                continue
        if name == "config":
            if value is None:
                value, i = _next_value(command, "config", args, i)
            path = Path(os.path.expanduser(value))
            layers.append((path, read_config(path)))
            continue
        tp = _option_type(command, name)
        if value is None:
            if i < len(args) and not args[i].startswith("--"):
                value = args[i]
                i += 1
            elif _is_bool(tp):
                _set(flags, name, True)
                continue
            else:
                raise ConfigError(f"--{name} needs a value")
        _set(flags, name, value if _is_text(tp) else _yaml_value(value))
    merged = deep_merge(merge_layers(layers), flags)
    required = [f.name for f in dataclasses.fields(command.options) if f.init and f.name not in merged
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"missing --{required[0]} (or '{required[0]}:' in a --config file)")
    try:
        options = command.build(layers, flags)
    except ConfigError as err:
        raise ConfigError(f"{err} ({command.prog} --help)") from None
    if print_config:
        print(options_yaml(options), end="")
        return Parsed(options=options, exit_code=0)
    return Parsed(options=options)


def sources_label(layers: Sequence[tuple[Path, Mapping]], flags: Mapping) -> str:
    """Where the options came from, for messages: ``"--config a.yaml, b.yaml and the command line"``."""
    files = ", ".join(str(path) for path, _ in layers)
    if files and flags:
        return f"--config {files} and the command line"
    return f"--config {files}" if files else "the command line"


def merge_layers(layers: Sequence[tuple[Path, Mapping]]) -> dict:
    """The mappings of ``layers`` merged in order (:func:`~tar_lightning.schema.deep_merge`)."""
    merged: dict = {}
    for _, data in layers:
        merged = deep_merge(merged, data)
    return merged


def options_yaml(options: Any) -> str:
    """The options as a YAML ``--config`` file (dataclasses as mappings, tuples as lists)."""
    return yaml.safe_dump(_plain(options), sort_keys=False)


def help_text(command: Command) -> str:
    """``--help``: usage, description, every option with its type, default and help line, deprecated flags."""
    hints = typing.get_type_hints(command.options)
    rows = []
    for f in dataclasses.fields(command.options):
        if not f.init or f.metadata.get("hidden"):
            continue
        tp = _type_name(hints[f.name])
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip().removesuffix("...")
            default = f"default {shown.strip()}" if len(shown) <= 40 else "default: see --print_config"
        else:
            default = "required"
        text = f.metadata.get("help", "")
        rows.append((f"--{f.name} {tp}", f"{text} ({default})" if text else f"({default})"))
    rows.append(("--config FILE", "YAML mapping of these options; repeatable, merged in order"))
    rows.append(("--print_config", "print the resolved options as YAML (a valid --config file) and exit"))
    width = min(max(len(a) for a, _ in rows), 30)
    lines = [f"usage: {command.prog} [--config FILE ...] [--KEY VALUE ...] [--print_config]", "",
             command.description, "", "options (also keys of a --config file; later files and flags win):"]
    for a, b in rows:
        if len(a) > width:
            lines += [f"  {a}", f"  {'':{width}}  {b}"]
        else:
            lines.append(f"  {a:{width}}  {b}")
    if command.deprecated:
        lines += ["", f"deprecated flags (removed in {REMOVED_IN}):"]
        for old, new in command.deprecated.items():
            lines.append(f"  {old:{width}}  {_new_spelling(new)}")
    if command.notes:
        lines += ["", *command.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ helpers
def read_config(path: Path) -> dict:
    """A ``--config`` file's mapping; ConfigError naming the file when it is unreadable, not YAML or not a
    mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{where} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of options at the top level, got "
                          f"{type(data).__name__}")
    return dict(data)


def _next_value(command: Command, name: str, args: list[str], i: int) -> tuple[str, int]:
    if i >= len(args) or args[i].startswith("--"):
        raise ConfigError(f"--{name} needs a value")
    return args[i], i + 1


def _deprecated(command: Command, flag: str, old: Deprecated, value: Optional[str], args: list[str], i: int):
    warnings.warn(f"{command.prog} {flag} is deprecated and will be removed in {REMOVED_IN}; use "
                  f"{_new_spelling(old)}", FutureWarning, stacklevel=4)
    if old.mapping:
        if value is None:
            value, i = _next_value(command, flag[2:], args, i)
        regime, sep, path = value.partition("=")
        if not sep or not regime or not path:
            raise ConfigError(f"{flag} expects NAME=VALUE, got {value!r}")
        return None, (f"{old.key}.{regime}", path), i
    if old.value is not None:
        return old.key, _yaml_dump_scalar(old.value), i
    return old.key, value, i


def _new_spelling(new: Deprecated) -> str:
    if new.mapping:
        return f"--{new.key}.NAME VALUE"
    if new.value is not None:
        return f"--{new.key} {_yaml_dump_scalar(new.value)}"
    return f"--{new.key}"


def _yaml_dump_scalar(value: Any) -> str:
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(flags: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = flags
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def _option_type(command: Command, dotted: str) -> Any:
    """The annotation of option ``dotted`` (walking nested dataclasses), or ConfigError for an unknown one."""
    cls: Any = command.options
    parts = dotted.split(".")
    tp: Any = None
    for depth, part in enumerate(parts):
        cls = _unwrap_optional(cls)
        if not dataclasses.is_dataclass(cls):
            if typing.get_origin(cls) is dict or cls is dict:
                return Any  # free-form mapping: any key
            raise ConfigError(f"--{'.'.join(parts[:depth])} takes a value, not sub-keys "
                              f"(got --{dotted})")
        names = [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("hidden")]
        if part not in names:
            where = f"--{'.'.join(parts[:depth])}." if depth else "--"
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown option --{dotted}{hint} (options: {valid})")
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    return tp


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Union:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _is_bool(tp: Any) -> bool:
    return _unwrap_optional(tp) is bool


def _is_text(tp: Any) -> bool:
    return _unwrap_optional(tp) is str


def _type_name(tp: Any) -> str:
    inner = _unwrap_optional(tp)
    if inner is bool:
        return "BOOL"
    if inner is int:
        return "INT"
    if inner is float:
        return "FLOAT"
    if inner is str:
        return "TEXT"
    if dataclasses.is_dataclass(inner):
        return "{...}"
    if typing.get_origin(inner) is dict or inner is dict:
        return "{NAME: VALUE}"
    if typing.get_origin(inner) is list:
        return "[...]"
    return "VALUE"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("hidden")}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
