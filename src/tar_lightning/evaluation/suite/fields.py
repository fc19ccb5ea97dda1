"""The building blocks of suite files: the valid keys, the rounding of scaled counts, and the field converters
(``metadata={"coerce": ...}`` of :mod:`tar_lightning.schema`) shared by the suite's dataclasses."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.adversaries.optim import OPTIMIZERS
from tar_lightning.common import is_int
from tar_lightning.errors import ConfigError
from tar_lightning.schema import number

ATTACK_KEYS: tuple[str, ...] = (
    "id", "comment", "seeds", "eval_every", "merge_lora", "epochs", "search", "sweep"
)
#: AdversaryConfig fields an attack entry may set (``name`` is the attack id; ``probability`` is TAR's).
ADVERSARY_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AdversaryConfig) if f.name not in ("name", "probability")
)
SUITE_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "seed",
    "seeds",
    "seq_len",
    "eval_every",
    "data",
    "evaluation",
    "defaults",
    "attacks",
)
METRIC_KINDS: tuple[str, ...] = ("heldout_loss", "heldout_entropy", "mcq", "callable", "refusal_rate", "asr")
DIRECTIONS: tuple[str, ...] = ("higher_is_better", "lower_is_better")
_DIRECTION_ALIASES = {"higher": "higher_is_better", "lower": "lower_is_better"}
SEARCH_METHODS = ("full", "lora")
SEARCH_SCHEDULES = ("constant", "warmup_cosine", "linear_warmup", "cosine_restarts", "exponential_warmup")

# An attack id names its result files (``<out>/runs/<id>__seed<n>.json``), so it must be a plain file name.
PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: 2.5 -> 3 (Python's ``round`` would give 2)."""
    return math.floor(x + 0.5)


def scale_count(n: int, scale: float, minimum: int = 1) -> int:
    """``max(minimum, round_half_up(n * scale))``."""
    return max(minimum, round_half_up(n * scale))


def check_keys(data: Any, valid: Sequence[str], where: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} ({data!r})")
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {list(valid)}")
    return data


def direction(value: Any, where: str) -> str:
    value = _DIRECTION_ALIASES.get(value, value) if isinstance(value, str) else value
    if not isinstance(value, str) or value not in DIRECTIONS:
        raise ConfigError(f"{where} must be one of {list(DIRECTIONS)}, got {value!r}")
    return value


def optional_number(value: Any, where: str) -> Optional[float]:
    return None if value is None else number(value, where)


def float_range(value: Any, where: str) -> tuple:
    return value_range(value, where, integer=False)


def int_range(value: Any, where: str) -> tuple:
    return value_range(value, where, integer=True)


def optimizer_names(value: Any, where: str) -> Optional[list[str]]:
    """Field converter: ``None`` or a non-empty list of names from
    :data:`tar_lightning.adversaries.optim.OPTIMIZERS`."""
    if value is None:
        return None
    names = name_list(value, where)
    for name in names:
        if name not in OPTIMIZERS:
            raise ConfigError(f"{where}: unknown optimizer {name!r}; expected names from {list(OPTIMIZERS)}")
    return names


def name_list(value: Any, where: str) -> list[str]:
    """A non-empty list of distinct non-empty strings."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where} must be a non-empty list of names, got {value!r}")
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: {list(value)} repeats a name")
    return [str(v) for v in value]


def names_or_none(value: Any, where: str) -> Optional[list[str]]:
    """Field converter: ``None`` or :func:`name_list`."""
    return None if value is None else name_list(value, where)


def seeds_or_none(value: Any, where: str) -> Optional[list[int]]:
    return None if value is None else seed_list(value, where)


def free_text(value: Any, where: str) -> str:
    return "" if value is None else str(value)


def seed_list(value: Any, where: str) -> list[int]:
    """A seed count ``n`` (seeds ``0..n-1``) or a list of distinct integer seeds."""
    if is_int(value):
        if value < 1:
            raise ConfigError(f"{where} must be a count >= 1 or a list of integers, got {value!r}")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: {list(value)} repeats a seed")
        return [int(v) for v in value]
    raise ConfigError(f"{where} must be a count >= 1 or a non-empty list of integers, got {value!r}")


def value_range(value: Any, where: str, integer: bool) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where} must be [low, high], got {value!r}")
    if integer:
        if not all(is_int(v) and v >= 1 for v in value):
            raise ConfigError(f"{where} must be two integers >= 1, got {value!r}")
        lo, hi = int(value[0]), int(value[1])
    else:
        lo, hi = (number(v, where) for v in value)
        if lo <= 0:
            raise ConfigError(f"{where} must be positive, got {value!r}")
    if lo > hi:
        raise ConfigError(f"{where}: low {lo} is above high {hi}")
    return lo, hi

