"""Plain data (a YAML/JSON mapping) to typed dataclasses: the library's one coercion.

Every configuration object that is read from a file — ``AdversaryConfig`` (and its ``LoRAConfig`` /
``SwitchConfig``), ``TARConfig``, the demo's ``DemoConfig`` and the red-team suite's ``SearchSpace``,
``MetricSpec``, ``ScoreSpec`` — is built by :func:`from_mapping`: unknown keys are refused with the list of
valid ones, and every value is checked against (and converted to) its field's annotation.

Why our own and not OmegaConf's structured configs or jsonargparse: both convert strings silently (OmegaConf
turns ``steps: "3"`` into 3 and ``merge: "yes"`` into ``True``), neither takes ``Literal`` choices together with
nested dataclasses inside ``Optional``/``Union`` the way our configs use them, and their errors do not name the
file and key the way the CLI reports them. The one deliberate conversion here is a number written as a string
for a ``float`` field, because YAML 1.1 reads ``2e-5`` as the string ``"2e-5"``.

Conversion rules (``tp`` is the annotation):

- a dataclass: a mapping, built recursively (an instance is kept as is);
- ``Optional[X]`` / ``Union[...]``: ``None`` where allowed, else the first option that converts;
- ``Literal[...]``: one of the listed values;
- ``list[X]``, ``tuple[X, Y]``, ``dict``: the container, items converted;
- ``bool``: only ``true``/``false``; ``int``: a Python int (a float with an integer value is converted; a bool
  is refused); ``float``: an int, a float or a string that parses as a number; ``str``: a string;
- anything else (``Any``, unannotated): kept as is.

A field may name its own converter in its metadata, ``field(metadata={"coerce": fn})``, called as
``fn(value, where)`` where ``where`` is ``"<label>: <path>"``; it returns the converted value or raises
:class:`~tar_lightning.errors.ConfigError`. Range and cross-field rules are the dataclass's own ``validate`` /
``__post_init__``; this module only checks types.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, Union

from tar_lightning.common import is_int, is_number
from tar_lightning.errors import ConfigError

__all__ = [
    "coerce",
    "deep_merge",
    "field_names",
    "from_mapping",
    "int_at_least",
    "non_negative_number",
    "number",
    "positive_int_or_none",
    "positive_number",
    "positive_number_or_none",
]

COERCE = "coerce"  # dataclass field metadata key of a field's own converter


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key (recursively), anything else replaced by a copy.

    The one merge of configuration layers (a config file over the defaults, a size preset, a later ``--config``
    file, a dotted command-line override); neither argument is modified.
    """
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def positive_int_or_none(value: Any, where: str) -> Any:
    """Field converter (``metadata={"coerce": positive_int_or_none}``): an integer >= 1, or ``None``."""
    if value is not None and (not is_int(value) or value < 1):
        raise ConfigError(f"{where} must be an integer >= 1 or null, got {value!r}")
    return value


def int_at_least(minimum: int) -> Callable[[Any, str], int]:
    """Field converter (``metadata={"coerce": int_at_least(1)}``): an integer >= ``minimum`` (a float with an
    integer value is converted, as :func:`coerce` does for ``int``); also the one range check for integers
    outside dataclasses (``int_at_least(0)(value, "key")``)."""

    def convert(value: Any, where: str) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not is_int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
        return value

    return convert


def number(value: Any, where: str) -> float:
    """Field converter: a number, as a float (a string that parses as one too: YAML 1.1 reads ``2e-5`` as text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not is_number(value):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def positive_number(value: Any, where: str) -> float:
    """Field converter: a number > 0 (:func:`number`)."""
    try:
        out = number(value, where)
    except ConfigError:
        out = None
    if out is None or not out > 0:
        raise ConfigError(f"{where} must be a number > 0, got {value!r}")
    return out


def non_negative_number(value: Any, where: str) -> float:
    """Field converter: a finite number >= 0 (:func:`number`)."""
    try:
        out = number(value, where)
    except ConfigError:
        out = None
    if out is None or not math.isfinite(out) or out < 0:
        raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
    return out


def positive_number_or_none(value: Any, where: str) -> Optional[float]:
    """Field converter: ``None`` or a number > 0 (:func:`positive_number`)."""
    return None if value is None else positive_number(value, where)


def field_names(cls: type) -> list[str]:
    """The field names of dataclass ``cls``, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def from_mapping(cls: type, data: Any, label: str, path: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data`` (a mapping), converting every value to its field's annotation.

    Args:
        cls: the dataclass.
        data: a mapping of field names to values, or an instance of ``cls`` (returned unchanged).
        label: what is being read, for messages (``"adversary 'w08' (suite.yaml, attacks[3])"``).
        path: the dotted path of ``data`` inside ``label`` (``"lora"``; empty at the top).

    Returns:
        The instance. Fields missing from ``data`` take their defaults.

    Raises:
        ConfigError: ``data`` is not a mapping, a key is not a field (the message lists the valid keys), a
            field without a default is missing, or a value does not convert (the message names ``label``, the key's path, the value and the type).
    """
    if isinstance(data, cls):
        return data
    where = f"{label}: {path}" if path else label
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            inside = f" in {path}" if path else ""
            raise ConfigError(f"{label}: unknown key {key!r}{inside}; valid keys: {list(fields)}")
    missing = [name for name, f in fields.items() if f.init and name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        inside = f" in {path}" if path else ""
        raise ConfigError(f"{label}: missing key {missing[0]!r}{inside} (required: {missing})")
    values = {}
    for key, value in data.items():
        field_path = f"{path}.{key}" if path else key
        convert = fields[key].metadata.get(COERCE)
        if convert is not None:
            values[key] = convert(value, f"{label}: {field_path}")
        else:
            values[key] = coerce(value, hints[key], label, field_path)
    return cls(**values)


def coerce(value: Any, tp: Any, label: str, path: str) -> Any:
    """Converts ``value`` to annotation ``tp`` (rules in the module docstring), or raises ConfigError naming
    ``label`` and ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, label, path)
    if origin is Union:
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{label}: {path} must not be null")
        options = [option for option in args if option is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], label, path)
        for option in options:
            try:
                return coerce(value, option, label, path)
            except ConfigError:
                pass
        expected = str(tp).replace("typing.", "")
        raise ConfigError(f"{label}: {path} must be of type {expected}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{label}: {path} must be one of {list(args)}, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: {path} must be a list, got {value!r}")
        if not args:
            return list(value)
        return [coerce(v, args[0], label, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{label}: {path} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, t, label, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{label}: {path} must be a mapping, got {value!r}")
        if len(args) == 2:
            return {k: coerce(v, args[1], label, f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{label}: {path} must be true or false, got {value!r}")
    if tp is int:
        if is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{label}: {path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{label}: {path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{label}: {path} must be a string, got {value!r}")
    return value
