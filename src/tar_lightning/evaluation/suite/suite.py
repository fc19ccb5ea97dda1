"""A red-team suite: :class:`Suite` (attacks, data regimes, evaluation), reading it from YAML
(:func:`load_suite`, :func:`suite_path` for the shipped ones) and the trust check of callable metrics."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tar_lightning.common import is_int, is_number
from tar_lightning.data.sources import DataSource, as_source
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.suite.attacks import AttackSpec
from tar_lightning.evaluation.suite.fields import (
    ADVERSARY_KEYS,
    PLAIN_ID,
    SUITE_KEYS,
    check_keys,
    free_text,
    seed_list,
)
from tar_lightning.evaluation.suite.scoring import EvaluationSpec
from tar_lightning.resources import shipped, shipped_names
from tar_lightning.schema import COERCE, from_mapping, positive_int_or_none

# ------------------------------------------------------------------------------------------------ suite
#: Shipped folder of the suites (installed with the package; :func:`tar_lightning.resources.shipped`).
_SHIPPED = "recipes/redteam"


def _regimes(value: Any, where: str) -> dict[str, DataSource]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where} must map regime names to data sources, got {value!r}")
    prefix = where.rsplit(": ", 1)[0]
    return {str(k): as_source(v, f"{prefix}: data regime {k!r}") for k, v in value.items()}


def _seq_len(value: Any, where: str) -> int:
    if not is_int(value) or value < 2:
        raise ConfigError(f"{where} must be an integer >= 2, got {value!r}")
    return value


@dataclass
class Suite:
    """A red-team suite: attacks, the data regimes they train on, and the evaluation.

    Attributes:
        name: suite name (``weaponization``, ``durability``, ``refusal``, ...).
        attacks: the attacks, in file order.
        data: data regime name -> source (attack streams and held-out evaluation text).
        evaluation: metrics and scoring.
        seeds: default seeds of every attack.
        seed: the suite seed; a run's seed derives from (seed, attack id, run seed).
        seq_len: tokens per example.
        eval_every: default evaluation cadence during attacks (full scale; ``None``: before/after only).
        description: free text.
        path: the file the suite was read from.
    """

    name: str
    attacks: list[AttackSpec]
    data: dict[str, DataSource] = field(metadata={COERCE: _regimes})
    evaluation: EvaluationSpec
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={COERCE: seed_list})
    seed: int = 0
    seq_len: int = field(default=256, metadata={COERCE: _seq_len})
    eval_every: Optional[int] = field(default=None, metadata={COERCE: positive_int_or_none})
    description: str = field(default="", metadata={COERCE: free_text})
    path: Optional[str] = None

    def __post_init__(self) -> None:
        for i, attack in enumerate(self.attacks):
            if not isinstance(attack.id, str) or not PLAIN_ID.fullmatch(attack.id):
                raise ConfigError(
                    f"suite {self.name!r}{self._where()}: attacks[{i}] has id {attack.id!r}, which is not a plain "
                    "name; an attack id names its result files under the output folder, so it must be 1-100 "
                    "letters, digits, '.', '_' or '-', starting with a letter or digit"
                )
        ids = [a.id for a in self.attacks]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"suite {self.name!r}: attack ids must be unique; repeated: {dupes}")
        for attack in self.attacks:
            for stream in attack.streams:
                if stream not in self.data:
                    raise ConfigError(
                        f"suite {self.name!r}{self._where()}: attack {attack.id!r} "
                        + ("(sweep.data) " if attack.sweep is not None and stream in (attack.sweep.data or []) else "")
                        + "trains on data regime "
                        f"{stream!r}, which is not defined under 'data' (defined: {sorted(self.data)})"
                    )
        for name, metric in self.evaluation.metrics.items():
            if isinstance(metric.data, str) and metric.data not in self.data:
                raise ConfigError(
                    f"suite {self.name!r}{self._where()}: evaluation metric {name!r} reads data regime "
                    f"{metric.data!r}, which is not defined under 'data' (defined: {sorted(self.data)})"
                )

    def _where(self) -> str:
        return f" ({self.path})" if self.path else ""

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.attacks]

    def attack(self, attack_id: str) -> AttackSpec:
        """The attack with this id.

        Raises:
            ConfigError: no such attack (the message lists the ids).
        """
        for a in self.attacks:
            if a.id == attack_id:
                return a
        raise ConfigError(f"suite {self.name!r} has no attack {attack_id!r}; its attacks: {self.ids}")

    def seeds_of(self, attack: AttackSpec) -> list[int]:
        return list(attack.seeds) if attack.seeds is not None else list(self.seeds)

    def scaled(
        self, scale: float = 1.0, *, max_steps: Optional[int] = None, max_batch_size: Optional[int] = None
    ) -> Suite:
        """A copy whose attacks are shrunk by ``scale`` (multiplying any earlier scale) and capped.

        See the module docstring for the rounding rules.

        Raises:
            ConfigError: ``scale`` is not a number > 0, or a cap is not an integer >= 1.
        """
        if not is_number(scale) or scale <= 0:
            raise ConfigError(f"scale must be a number > 0, got {scale!r}")
        for name, cap in (("max_steps", max_steps), ("max_batch_size", max_batch_size)):
            if cap is not None and (not is_int(cap) or cap < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or None, got {cap!r}")
        out = copy.deepcopy(self)
        for attack in out.attacks:
            attack.scale *= float(scale)
            if max_steps is not None:
                attack.max_steps = max_steps if attack.max_steps is None else min(attack.max_steps, max_steps)
            if max_batch_size is not None:
                attack.max_batch_size = (
                    max_batch_size
                    if attack.max_batch_size is None
                    else min(attack.max_batch_size, max_batch_size)
                )
        return out

    def select(self, ids: Iterable[str]) -> Suite:
        """A copy holding only the named attacks (in suite order).

        Raises:
            ConfigError: an id that is not in the suite.
        """
        wanted = [i.strip() for i in ids if i and i.strip()]
        for i in wanted:
            self.attack(i)
        out = copy.deepcopy(self)
        out.attacks = [a for a in out.attacks if a.id in wanted]
        return out

    def with_seeds(self, seeds: Union[int, Sequence[int]]) -> Suite:
        """A copy where every attack runs the given seeds (a count or a list), overriding per-attack seeds."""
        chosen = seed_list(seeds if is_int(seeds) else list(seeds), f"suite {self.name!r}")
        out = copy.deepcopy(self)
        out.seeds = chosen
        for attack in out.attacks:
            attack.seeds = None
        return out

    def with_data(self, overrides: Mapping[str, Union[str, Mapping, DataSource]]) -> Suite:
        """A copy with some data regimes replaced (a path, DataSource fields, or a DataSource).

        Raises:
            ConfigError: a regime the suite does not define, or invalid source fields.
        """
        out = copy.deepcopy(self)
        for name, value in overrides.items():
            if name not in out.data:
                raise ConfigError(
                    f"suite {self.name!r}: no data regime {name!r} to override; regimes: {sorted(out.data)}"
                )
            out.data[name] = as_source(value, f"data regime {name!r}")
        return out

    def to_dict(self) -> dict:
        """Plain data (for results files and configuration hashes)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "seeds": list(self.seeds),
            "seq_len": self.seq_len,
            "eval_every": self.eval_every,
            "data": {k: dataclasses.asdict(v) for k, v in self.data.items()},
            "evaluation": self.evaluation.to_dict(),
            "attacks": [
                {
                    "id": a.id,
                    "comment": a.comment,
                    "seeds": a.seeds,
                    "scale": a.scale,
                    "max_steps": a.max_steps,
                    "max_batch_size": a.max_batch_size,
                    "epochs": a.epochs,
                    "adversary": dataclasses.asdict(a.adversary),
                }
                for a in self.attacks
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "suite") -> Suite:
        """Builds a suite from plain data (the YAML file's content).

        Raises:
            ConfigError: naming ``where`` and the offending key or value.
        """
        data = dict(check_keys(data, SUITE_KEYS, where))
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        defaults = data.pop("defaults", None) or {}
        if not isinstance(defaults, Mapping):
            raise ConfigError(f"{where}: 'defaults' must be a mapping of adversary fields, got {defaults!r}")
        bad = [k for k in defaults if k not in ADVERSARY_KEYS]
        if bad:
            raise ConfigError(
                f"{where}: defaults: unknown key {bad[0]!r}; valid keys: {list(ADVERSARY_KEYS)}"
            )
        raw_attacks = data.get("attacks")
        if not isinstance(raw_attacks, list) or not raw_attacks:
            raise ConfigError(f"{where}: 'attacks' must be a non-empty list of attacks")
        # attacks read the suite's defaults, and evaluation its file name: built here, then typed with the rest
        data["attacks"] = [
            AttackSpec.from_dict(a, defaults, f"{where}, attacks[{i}]") for i, a in enumerate(raw_attacks)
        ]
        if "evaluation" not in data:
            raise ConfigError(f"{where}: missing the 'evaluation' block (metrics, safety, capability)")
        data["evaluation"] = EvaluationSpec.from_dict(data["evaluation"], where)
        if "seeds" not in data:
            data["seeds"] = 3
        data["path"] = None if where == "suite" else where
        return from_mapping(cls, data, where)


TRUST_CALLABLE_FLAG = "--trust_callable_metrics"


def check_callable_trust(suite: Suite, trust_callable: bool) -> None:
    """Refuses a suite with ``kind: callable`` metrics unless the user trusts it.

    A callable metric imports and calls the ``module:function`` its suite file names, so reading a suite would
    run arbitrary code; it runs only with ``tar-lightning redteam --trust_callable_metrics`` (Python:
    ``run_redteam(..., trust_callable=True)`` / ``build_evaluator(..., trust_callable=True)``).

    Raises:
        ConfigError: a callable metric and ``trust_callable`` false (naming the suite, metric, target and flag).
    """
    if trust_callable:
        return
    for name, metric in suite.evaluation.metrics.items():
        if metric.kind == "callable":
            raise ConfigError(
                f"suite {suite.name!r}{suite._where()}: metric {name!r} is kind 'callable' and would import and run "
                f"{metric.target!r}; run it only if you trust this suite: pass {TRUST_CALLABLE_FLAG} "
                "(Python: trust_callable=True)"
            )


def suite_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """A suite file: an existing path, or the name of a shipped suite (``durability`` -> recipes/redteam).

    Raises:
        ConfigError: neither a file nor a shipped suite name.
    """
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.is_file():
        return path
    names = shipped_names(_SHIPPED)
    if os.fspath(name_or_path) in names:
        return shipped(f"{_SHIPPED}/{os.fspath(name_or_path)}.yaml")
    raise ConfigError(
        f"red-team suite {os.fspath(name_or_path)!r} not found: not a file, nor a shipped suite ({names})"
    )


def load_suite(path: Union[str, os.PathLike]) -> Suite:
    """Reads a suite YAML (OmegaConf, ``${...}`` interpolation resolved) with strict keys.

    Args:
        path: the file, or the name of a shipped suite (``weaponization``, ``durability``, ``refusal``).

    Returns:
        The suite; every attack's adversary is validated.

    Raises:
        ConfigError: a missing or unparsable file, an unknown key (naming the file, attack id and key, and
            listing the valid keys), an invalid value, an undefined data regime, repeated attack ids.
    """

    file = suite_path(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{file}: cannot resolve the suite: {err}") from err
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{file}: not valid YAML: {err}") from err
    return Suite.from_dict(raw, where=str(file))

