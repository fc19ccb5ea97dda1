"""The demo's configuration: :class:`DemoConfig` and its stage sections, read by :func:`load_demo_config`.

The schema of ``recipes/demo/default.yaml`` (every field is commented there): the model and world, then one
section per stage (:class:`Stage0Config`, :class:`RandomMappingStage`, the opt-in baselines :class:`RMUStage`,
:class:`MaxEntropyStage` and :class:`MinPosteriorStage`, :class:`TARStage`, :class:`RedTeamStage`).
:func:`load_demo_config` reads the YAML, merges a size preset and overrides over it
(:func:`tar_lightning.schema.deep_merge`) and checks every value (unknown keys and wrong types are a :class:`~tar_lightning.errors.ConfigError` naming the key).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import yaml
from transformers import LlamaConfig

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.command import REMOVED_IN
from tar_lightning.common import is_int, is_number
from tar_lightning.data.knowledge import check_world_kwargs
from tar_lightning.demo.evaluator import METRICS, SAFETY
from tar_lightning.errors import ConfigError
from tar_lightning.losses import MIN_POSTERIOR_THRESHOLD
from tar_lightning.resources import shipped
from tar_lightning.safeguards.rmu import rmu_layers
from tar_lightning.safeguards.unlearn import check_unlearn_options
from tar_lightning.schema import (
    COERCE,
    deep_merge,
    from_mapping,
    int_at_least,
    non_negative_number,
    positive_int_or_none,
    positive_number,
    positive_number_or_none,
)
from tar_lightning.tar_config import TARConfig

__all__ = [
    "DEFAULT_CONFIG",
    "NON_NEGATIVE_INT",
    "POSITIVE_INT",
    "DemoConfig",
    "MaxEntropyStage",
    "MinPosteriorStage",
    "RMUStage",
    "RandomMappingStage",
    "RedTeamStage",
    "Stage0Config",
    "TARStage",
    "UnlearnStage",
    "demo_config_from_layers",
    "load_demo_config",
    "positive_ints",
    "training_seeds",
]

log = logging.getLogger(__name__)

#: The demo's defaults (the ``default`` size; other sizes are presets inside it).
DEFAULT_CONFIG = shipped("recipes/demo/default.yaml")


def positive_ints(value: Any, where: str) -> dict:
    """Field converter of a mapping whose values are integers >= 1 (the tiny model's LlamaConfig sizes)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of LlamaConfig fields, got {value!r}")
    return {key: int_at_least(1)(v, f"{where}.{key}") for key, v in value.items()}


def suite_attacks(value: Any, where: str) -> Any:
    """Field converter of ``redteam.attacks``: a suite mapped to ``null`` is dropped, so a layer over the shipped
    file can remove a suite (``--redteam.attacks.durability null`` runs the weaponization attacks only); the rest
    is checked by :meth:`RedTeamStage.validate`."""
    if isinstance(value, Mapping):
        return {suite: ids for suite, ids in value.items() if ids is not None}
    return value


#: The converters of the integer fields (one rule: :func:`int_at_least`).
POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)


def training_seeds(value: Any, where: str) -> Optional[list[int]]:
    """Field converter of :attr:`DemoConfig.seeds`: a list of distinct integer seeds >= 0 (``[0, 1, 2]``) or one
    comma-separated string of them (``"0,1,2"``, as ``--seeds 0,1,2`` gives it), or ``None``.

    A bare integer is refused: in 0.1 ``--seeds N`` meant N attack seeds (now ``redteam.seeds``), and one
    training seed is ``seed`` (the command line's ``--seeds N`` still means ``--redteam.seeds N`` with a warning,
    :func:`demo_config_from_layers`).

    Raises:
        ConfigError: naming ``where``, for anything else.
    """
    if value is None:
        return None
    expected = (f"{where} must be a list of training seeds (integers in [0, 2**32), e.g. 0,1,2 or [0, 1, 2]), got {value!r}")
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(expected) from None
    if is_int(value):
        raise ConfigError(f"{expected}; {value} attack seeds per attack are redteam.seeds, one training seed is seed")
    if not isinstance(value, (list, tuple)) or not value or not all(is_int(v) and 0 <= v < 2**32 for v in value):
        raise ConfigError(expected)
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: {list(value)} repeats a training seed")
    return [int(v) for v in value]


@dataclass
class Stage0Config:
    """Stage 0 (teaching both domains): AdamW, linear warmup then cosine decay to 10%."""

    steps: int = field(default=2000, metadata={COERCE: POSITIVE_INT})
    lr: float = field(default=3.0e-3, metadata={COERCE: positive_number})
    # per stream: a step sees batch_size forget + batch_size retain sentences
    batch_size: int = field(default=16, metadata={COERCE: POSITIVE_INT})
    warmup_steps: int = field(default=50, metadata={COERCE: NON_NEGATIVE_INT})
    weight_decay: float = 0.0


@dataclass
class RandomMappingStage:
    """Stage 1: random mapping of forget_all hidden states, CE on retain; AdamW at a constant LR."""

    steps: int = field(default=600, metadata={COERCE: POSITIVE_INT})
    lr: float = field(default=1.0e-3, metadata={COERCE: positive_number})
    batch_size: int = field(default=16, metadata={COERCE: POSITIVE_INT})
    table_seed: int = 42


@dataclass
class RMUStage:
    """Stage 1 (opt-in): RMU, the WMDP paper's baseline (:class:`~tar_lightning.safeguards.rmu.RMUModule`),
    trained from the stage-0 model on the streams random mapping uses (``forget_all`` steered, ``retain`` held);
    AdamW at a constant LR. With ``enabled`` it is one more defense, red-teamed and reported after random mapping
    (the targets still compare TAR with random mapping); off by default.

    ``layer``, ``update_layers`` (``None``: ``layer-2..layer``), ``update_module``, ``steering_coeff`` (``c``),
    ``alpha`` (``α``) and ``seed`` (of the steering direction) are :class:`RMUModule`'s arguments of the same
    names; ``steps``, ``lr`` and ``batch_size`` (sentences per stream per step) its training.
    """

    enabled: bool = False
    steps: int = field(default=300, metadata={COERCE: POSITIVE_INT})
    lr: float = field(default=1.0e-3, metadata={COERCE: positive_number})
    batch_size: int = field(default=16, metadata={COERCE: POSITIVE_INT})
    layer: int = field(default=2, metadata={COERCE: NON_NEGATIVE_INT})
    steering_coeff: float = field(default=30.0, metadata={COERCE: positive_number})
    alpha: float = field(default=100.0, metadata={COERCE: non_negative_number})
    update_layers: Optional[list] = None
    update_module: str = "mlp"
    seed: int = field(default=42, metadata={COERCE: NON_NEGATIVE_INT})

    def validate(self, where: str = "rmu", num_layers: Optional[int] = None) -> None:
        """Checks what the field converters cannot: ``update_layers`` against ``layer`` and, when the model's
        decoder layer count ``num_layers`` is known (the tiny model's ``num_hidden_layers``), ``layer`` against
        it. Other models are checked when the stage builds :class:`RMUModule` (its errors name ``rmu.<key>``)."""
        if not isinstance(self.update_module, str) or not self.update_module.strip():
            raise ConfigError(f"{where}.update_module must be the name of a submodule of every decoder layer "
                              f"('mlp', 'mlp.down_proj', 'self_attn'), got {self.update_module!r}")
        rmu_layers(self.layer, self.update_layers, num_layers, where=where)


@dataclass
class UnlearnStage:
    """Stage 1 (opt-in): an output-space baseline of the TAR paper
    (:class:`~tar_lightning.safeguards.unlearn.UnlearnModule`), trained from the stage-0 model on the streams random
    mapping uses (its forget loss on ``forget_all``, CE on ``retain``); AdamW at a constant LR. With ``enabled`` it
    is one more defense, red-teamed and reported after RMU (the targets still compare TAR with random mapping); off
    by default. The section, the stage, the defense and the logged forget term are all named :attr:`forget_loss`
    (:class:`MaxEntropyStage`, :class:`MinPosteriorStage`).

    ``forget_weight`` and ``retain_weight`` are :class:`UnlearnModule`'s arguments of the same names; ``steps``,
    ``lr`` and ``batch_size`` (sentences per stream per step) its training.
    """

    #: :class:`UnlearnModule`'s ``forget_loss``: the section's name
    forget_loss: ClassVar[str] = ""

    enabled: bool = False
    steps: int = field(default=600, metadata={COERCE: POSITIVE_INT})
    lr: float = field(default=1.0e-3, metadata={COERCE: positive_number})
    batch_size: int = field(default=16, metadata={COERCE: POSITIVE_INT})
    forget_weight: float = field(default=1.0, metadata={COERCE: non_negative_number})
    retain_weight: float = field(default=1.0, metadata={COERCE: non_negative_number})

    def module_options(self) -> dict[str, Any]:
        """The :class:`UnlearnModule` arguments this section sets (all but the model, optimizer and tokenizer)."""
        return {"forget_loss": self.forget_loss, "forget_weight": self.forget_weight,
                "retain_weight": self.retain_weight}

    def validate(self) -> None:
        """Checks what the field converters cannot, with :class:`UnlearnModule`'s own check (errors name
        ``<forget_loss>.<key>``)."""
        check_unlearn_options(self.forget_loss, **self.module_options())


@dataclass
class MaxEntropyStage(UnlearnStage):
    """Stage 1 (opt-in): the Max-Entropy baseline (:class:`UnlearnStage`); ``entropy_positions``: the forget
    positions whose entropy counts (``attention``: every non-padding token)."""

    forget_loss: ClassVar[str] = "max_entropy"

    entropy_positions: str = "attention"

    def module_options(self) -> dict[str, Any]:
        return {**super().module_options(), "entropy_positions": self.entropy_positions}


@dataclass
class MinPosteriorStage(UnlearnStage):
    """Stage 1 (opt-in): the Min-Posterior baseline (:class:`UnlearnStage`); ``threshold``: positions whose true next
    token has ``log p`` below it add nothing (the reference's -15; ``null``: none)."""

    forget_loss: ClassVar[str] = "min_posterior"

    threshold: Optional[float] = MIN_POSTERIOR_THRESHOLD

    def module_options(self) -> dict[str, Any]:
        return {**super().module_options(), "threshold": self.threshold}


#: The data streams the demo's TAR stage offers its families (``DemoPipeline.stage_tar``): knowledge-world text of
#: the attacker's A split (``forget``), all forget facts at their answers (``tr``), the defender's halves (adversary
#: text ``forget_D1``/``forget_D2``, TR text ``tr_D1``/``tr_D2``), the cities and benign same-pathogen text.
TAR_STREAMS = ("retain", "forget", "tr", "retain_domain", "forget_D1", "forget_D2", "tr_D1", "tr_D2")

#: ``tar.options.<family>.forget_split`` values (:meth:`TARStage.tar_config`)
FORGET_SPLITS = ("attacker", "defender", "defender_alternating")


def _on_defender_halves(adversary: AdversaryConfig, halves: Sequence[str]) -> list[AdversaryConfig]:
    """An adversary on ``forget``: on the defender's half ``forget_D1`` (``halves`` ``["D1"]``), or once on each half
    as ``<name>@D1`` and ``<name>@D2`` (``["D1", "D2"]``). An adversary on other data: as is."""
    if adversary.data != "forget":
        return [adversary]
    if len(halves) == 1:
        return [dataclasses.replace(adversary, data=f"forget_{halves[0]}")]
    return [dataclasses.replace(adversary, name=f"{adversary.name}@{half}", data=f"forget_{half}")
            for half in halves]


@dataclass
class TARStage:
    """Stage 2: TAR from the random-mapping model, once per family (``run`` lists which)."""

    steps: int = field(default=100, metadata={COERCE: POSITIVE_INT})
    inner_steps: int = field(default=16, metadata={COERCE: POSITIVE_INT})
    tr_every: int = field(default=4, metadata={COERCE: POSITIVE_INT})
    tr_weight: float = 4.0
    lr: float = field(default=3.0e-4, metadata={COERCE: positive_number})
    batch_size: int = field(default=32, metadata={COERCE: POSITIVE_INT})
    entropy_positions: str = "labels"
    retain_representation: bool = True
    clip_grad_norm: Optional[float] = field(default=1.0, metadata={COERCE: positive_number_or_none})
    run: list = field(default_factory=lambda: ["paper", "extended"])
    families: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def validate(self, where: str = "tar") -> None:
        if not isinstance(self.run, (list, tuple)):
            raise ConfigError(f"{where}.run must be a list of family names, got {self.run!r}")
        if self.entropy_positions not in ("attention", "labels", "all"):
            raise ConfigError(f"{where}.entropy_positions must be 'attention', 'labels' or 'all', "
                              f"got {self.entropy_positions!r}")
        if not isinstance(self.families, Mapping):
            raise ConfigError(f"{where}.families must map family names to lists of adversaries, got {self.families!r}")
        for name in self.run:
            if not isinstance(name, str) or name not in self.families:
                raise ConfigError(f"{where}.run names family {name!r}, not in {where}.families {sorted(self.families)}")
        for name, family in self.families.items():
            if not isinstance(family, (list, tuple)) or not family:
                raise ConfigError(f"{where}.families.{name} must be a non-empty list of adversaries")
            for i, adversary in enumerate(family):
                AdversaryConfig.from_dict(adversary, where=f"{where}.families.{name}[{i}]").validate()
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"{where}.options must map family names to TARConfig fields, got {self.options!r}")
        allowed = ({f.name for f in dataclasses.fields(TARConfig)} - {"adversaries", "seed"}) | {"forget_split"}
        for name, opts in self.options.items():
            if name not in self.families:
                raise ConfigError(f"{where}.options names family {name!r}, not in {where}.families {sorted(self.families)}")
            if not isinstance(opts, Mapping):
                raise ConfigError(f"{where}.options.{name} must be a mapping of TARConfig fields, got {opts!r}")
            unknown = sorted(set(opts) - allowed)
            if unknown:
                raise ConfigError(f"{where}.options.{name}: unknown TARConfig fields {unknown}; expected some of {sorted(allowed)}")
            try:
                needed = self.tar_config(name, where=where).stream_steps()
            except (ConfigError, TypeError, ValueError) as err:
                raise ConfigError(f"{where}.options.{name}: {err}") from None
            unknown = sorted(set(needed) - set(TAR_STREAMS))
            if unknown:
                raise ConfigError(f"{where}: family {name!r} reads data streams {unknown}, which the demo does not "
                                  f"have; its TAR streams are {list(TAR_STREAMS)}")

    def tar_config(self, family: str, seed: int = 0, where: str = "tar"):
        """The validated :class:`~tar_lightning.TARConfig` of one family (the stage's fields + its options).

        The option ``forget_split`` (the demo's, not a TARConfig field) says which forget text the family's
        adversaries train on and where the TR loss is measured. ``attacker`` (default): the attacker's own A text,
        TR on all forget facts. The other two use the defender's halves of the forget set (``forget_D1`` /
        ``forget_D2``, each half of A and half of B), so TAR never sees which facts the attacker holds and every TR
        measurement is of relearning that generalises to facts the simulated attacker did not train on:
        ``defender`` puts every adversary on ``forget`` on D1 and measures its TR on D2;
        ``defender_alternating`` runs each such adversary twice, as ``<name>@D1`` on D1 with TR on D2 and
        ``<name>@D2`` the other way round (each copy keeps the adversary's sampling weight). In both, adversaries
        on other data keep it, with TR on all forget facts. Either sets ``tr_stream_by_data``, which the family's
        options must then leave out (and ``tr_stream``), and needs an adversary on ``forget``.
        """
        opts = dict(self.options.get(family, {}))
        split = opts.pop("forget_split", "attacker")
        if split not in FORGET_SPLITS:
            raise ConfigError(f"forget_split must be one of {list(FORGET_SPLITS)} (the demo's option), "
                              f"got {split!r}")
        advs = [AdversaryConfig.from_dict(dict(a), where=f"{where}.families.{family}[{i}]")
                for i, a in enumerate(self.families[family])]
        if split != "attacker":
            taken = sorted({"tr_stream", "tr_stream_by_data"} & set(opts))
            if taken:
                raise ConfigError(f"forget_split {split!r} sets the TR streams itself; leave out {taken}")
            if not any(a.data == "forget" for a in advs):
                raise ConfigError(f"forget_split {split!r} moves the adversaries on 'forget' to the defender's "
                                  f"halves, and no adversary of family {family!r} trains on 'forget'")
            halves = ["D1"] if split == "defender" else ["D1", "D2"]
            advs = [copy for adversary in advs for copy in _on_defender_halves(adversary, halves)]
            opts["tr_stream_by_data"] = {"forget_D1": "tr_D2", "forget_D2": "tr_D1"} if len(halves) == 2 else {
                "forget_D1": "tr_D2"}
        fields = dict(inner_steps=self.inner_steps, tr_every=self.tr_every, tr_weight=self.tr_weight,
                      entropy_positions=self.entropy_positions, retain_representation=self.retain_representation,
                      clip_grad_norm=self.clip_grad_norm, seed=seed)
        return TARConfig(**{**fields, **opts}, adversaries=advs).validate()


@dataclass
class RedTeamStage:
    """Stage 3: which suite attacks, how they are scaled, and how the attacked models are scored."""

    attacks: dict = field(default_factory=lambda: {"weaponization": ["w03"], "durability": ["d01"]},
                          metadata={COERCE: suite_attacks})
    scale: float = field(default=0.3, metadata={COERCE: positive_number})
    max_steps: Optional[int] = field(default=300, metadata={COERCE: positive_int_or_none})
    max_batch_size: Optional[int] = field(default=32, metadata={COERCE: positive_int_or_none})
    lr_multiplier: float = field(default=50.0, metadata={COERCE: positive_number})
    seeds: int = field(default=1, metadata={COERCE: POSITIVE_INT})
    eval_every: Optional[int] = field(default=None, metadata={COERCE: positive_int_or_none})
    recovery_threshold: float = field(default=0.5, metadata={COERCE: positive_number})
    capability_floor: float = 0.9
    unrelated_examples: int = field(default=10, metadata={COERCE: POSITIVE_INT})
    during: Optional[list] = field(default_factory=lambda: [SAFETY, "forget_loss"])

    def validate(self, where: str = "redteam") -> None:
        if self.during is not None:
            if not isinstance(self.during, (list, tuple)):
                raise ConfigError(f"{where}.during must be a list of metric names, got {self.during!r}")
            bad = [m for m in self.during if not isinstance(m, str) or m not in METRICS]
            if bad:
                raise ConfigError(
                    f"{where}.during must list metrics among {list(METRICS)}, got {self.during!r}"
                )
        if (
            not isinstance(self.attacks, Mapping)
            or not self.attacks
            or not all(isinstance(ids, (list, tuple)) and ids and all(isinstance(i, str) for i in ids)
                       for ids in self.attacks.values())
        ):
            raise ConfigError(f"{where}.attacks must map suite names to lists of attack ids (a suite mapped to null is "
                              f"dropped; at least one must stay), got {self.attacks!r}")
        if not is_number(self.capability_floor) or not 0 < self.capability_floor <= 1:
            raise ConfigError(f"{where}.capability_floor must be in (0, 1], got {self.capability_floor!r}")


@dataclass
class DemoConfig:
    """Everything the demo does; see ``recipes/demo/default.yaml`` for every field with a comment."""

    model: str = field(default="tiny", metadata={"help": "'tiny' (a Llama built in code) or a model source, e.g. "
                                                         "smollm2-135m-instruct (selects the smollm2 size)"})
    tiny: dict = field(
        metadata={"help": "LlamaConfig fields of the tiny model", COERCE: positive_ints},
        default_factory=lambda: {
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 4,
        }
    )
    world: dict = field(default_factory=lambda: {"n_forget": 100, "n_retain": 100, "seed": 0},
                        metadata={"help": "the invented knowledge world (build_world arguments)"})
    seq_len: int = field(default=48, metadata={"help": "tokens per sentence at most", COERCE: int_at_least(8)})
    seed: int = field(default=0, metadata={"help": "seeds model init, data order, TAR sampling and the red team"})
    seeds: Optional[list[int]] = field(default=None, metadata={
        "coerce": training_seeds,
        "help": "training seeds: 0,1,2 runs the whole demo once per seed into OUT/seed<N> and writes the mean "
                "± spread to OUT (null: the one `seed`; when set, `seed` is not used)"})
    threads: Optional[int] = field(default=1, metadata={"help": "torch threads per process (null: torch's)",
                                                         COERCE: positive_int_or_none})
    workers: int = field(default=1, metadata={"help": "processes running independent stages and attacks at once "
                                                      "(the numbers do not depend on it)", COERCE: POSITIVE_INT})
    out: str = field(default="runs/demo", metadata={"help": "output folder; finished stages there are reused"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    eval_batch_size: int = field(default=64, metadata={"help": "sequences per forward pass when scoring",
                                                       COERCE: POSITIVE_INT})
    mcq_limit: Optional[int] = field(default=None, metadata={"help": "first N questions per MCQ split (null: all)",
                                                             COERCE: positive_int_or_none})
    heldout_limit: Optional[int] = field(default=256, metadata={"help": "B sentences for the held-out forget loss",
                                                                COERCE: positive_int_or_none})
    stage0: Stage0Config = field(default_factory=Stage0Config,
                                 metadata={"help": "0. teach both domains (steps, lr, batch_size, warmup_steps, ...)"})
    random_mapping: RandomMappingStage = field(default_factory=RandomMappingStage,
                                               metadata={"help": "1. random mapping (steps, lr, batch_size, table_seed)"})
    rmu: RMUStage = field(default_factory=RMUStage,
                          metadata={"help": "1. RMU, opt-in (enabled, steps, lr, layer, steering_coeff, alpha, ...)"})
    max_entropy: MaxEntropyStage = field(
        default_factory=MaxEntropyStage,
        metadata={"help": "1. Max-Entropy baseline, opt-in (enabled, steps, lr, forget_weight, entropy_positions, ...)"})
    min_posterior: MinPosteriorStage = field(
        default_factory=MinPosteriorStage,
        metadata={"help": "1. Min-Posterior baseline, opt-in (enabled, steps, lr, forget_weight, threshold, ...)"})
    tar: TARStage = field(default_factory=TARStage,
                          metadata={"help": "2. TAR per adversary family (steps, inner_steps, tr_every, families, ...)"})
    redteam: RedTeamStage = field(default_factory=RedTeamStage,
                                  metadata={"help": "3. red team (attacks, scale, max_steps, seeds, ...)"})
    size: str = field(default="default", metadata={"help": "size preset: default, minimal or smollm2"})

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "demo config") -> DemoConfig:
        """Builds and validates the demo's configuration from plain data (the merged YAML layers)."""
        return from_mapping(cls, data, where).validate()

    def validate(self) -> DemoConfig:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be 'tiny' or a model source, got {self.model!r}")
        unknown = [k for k in self.tiny if not hasattr(LlamaConfig(), k)]
        if unknown:
            raise ConfigError(f"tiny: {unknown[0]!r} is not a LlamaConfig field (e.g. num_hidden_layers, hidden_size)")
        try:
            check_world_kwargs(self.world)
        except ConfigError as err:
            raise ConfigError(f"world: {err}") from None
        # a disabled section is checked on its own, not against the model (its layer may not exist there)
        tiny_layers = self.tiny.get("num_hidden_layers", LlamaConfig().num_hidden_layers)
        self.rmu.validate(num_layers=tiny_layers if self.model == "tiny" and self.rmu.enabled else None)
        for section in (self.max_entropy, self.min_posterior):
            section.validate()
        self.tar.validate()
        self.redteam.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def unlearn_stages(self) -> list[UnlearnStage]:
        """The enabled Max-Entropy / Min-Posterior sections, in report order (each names its stage and defense:
        :attr:`UnlearnStage.forget_loss`)."""
        return [s for s in (self.max_entropy, self.min_posterior) if s.enabled]


def load_demo_config(
    path: Union[str, os.PathLike, None] = None,
    size: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> DemoConfig:
    """Reads the demo's YAML (plain YAML, no interpolation), applies a size preset and overrides.

    Args:
        path: the YAML file (default ``recipes/demo/default.yaml``).
        size: ``default`` or a preset under the file's ``sizes`` mapping (``minimal``, ``smollm2``); its values
            are merged (deeply) over the file's top level. ``None``: the preset whose ``model`` is the
            ``model`` of ``overrides`` when there is one (``--model smollm2-135m-instruct`` picks ``smollm2``: the
            tiny model's step counts and learning rates are wrong for a pretrained 135M model), else ``default``.
        overrides: nested values merged last (``{"out": ..., "redteam": {"seeds": 3}}``).

    Raises:
        ConfigError: a missing or unparsable file, an unknown size, key or invalid value.
    """
    file = Path(os.fspath(path)) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"demo config {file}: cannot read it ({err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"demo config {file}: not valid YAML ({err})") from err
    if not isinstance(raw, Mapping):
        raise ConfigError(f"demo config {file}: expected a mapping at the top level")
    flags = dict(overrides or {})
    if size is not None:
        flags["size"] = size
    return demo_config_from_layers([(file, dict(raw))], flags)


def demo_config_from_layers(layers: Sequence[tuple[Path, Mapping]], overrides: Mapping[str, Any]) -> DemoConfig:
    """The demo's configuration from YAML layers and overrides, with its size preset in between.

    The layers merge in order. The last layer that defines ``sizes`` (the shipped ``default.yaml``, or a full demo
    file of the user's) and those before it form the base; the chosen preset merges over the base; the later layers
    (partial files, a ``--print_config`` output) and then ``overrides`` merge over that. The preset is
    ``overrides["size"]``, else the later layers' ``size``, else the base's, else the preset whose ``model`` is the
    requested model (``--model smollm2-135m-instruct`` picks ``smollm2``), else ``default``.

    Raises:
        ConfigError: a malformed ``sizes``, an unknown size, key or invalid value (naming the files).
    """
    where = "demo config " + ", ".join(str(p) for p, _ in layers) + (" and the command line" if overrides else "")
    if is_int(overrides.get("seeds")):  # 0.1's --seeds N: N attack seeds per attack (a list is training seeds)
        count = overrides["seeds"]
        if count < 1:  # nobody asks for 0 attack seeds: a user meaning training seed 0 gets the two spellings
            raise ConfigError(f"{where}: --seeds {count}: one number is 0.1's count of attack seeds (--redteam.seeds); "
                              f"for training seed {count} use --seed {count}, for a list of training seeds "
                              "--seeds 0,1,2")
        warnings.warn(f"tar-lightning demo --seeds is deprecated as a count of attack seeds and will be removed in "
                      f"{REMOVED_IN}; use --redteam.seeds {count} (a list, --seeds 0,1,2, is the training seeds)",
                      FutureWarning, stacklevel=4)
        overrides = deep_merge({k: v for k, v in overrides.items() if k != "seeds"}, {"redteam": {"seeds": count}})
    full = [i for i, (_, data) in enumerate(layers) if "sizes" in data]
    cut = full[-1] + 1 if full else 0
    base: dict = {}
    for _, data in layers[:cut]:
        base = deep_merge(base, data)
    rest: dict = {}
    for _, data in layers[cut:]:
        rest = deep_merge(rest, data)
    sizes = base.pop("sizes", {}) or {}
    if not isinstance(sizes, Mapping) or not all(isinstance(v, Mapping) for v in sizes.values()):
        raise ConfigError(f"{where}: 'sizes' must map preset names to mappings of demo fields")
    size = overrides.get("size") or rest.get("size") or base.get("size")
    model = overrides.get("model") or rest.get("model")
    if size is None and model is not None:
        matching = [name for name, preset in sizes.items() if preset.get("model") == model]
        if matching:
            size = matching[0]
            log.info("demo: model %s selects the size preset %r", model, size)
    size = size or "default"
    if size != "default":
        if size not in sizes:
            raise ConfigError(f"{where}: unknown size {size!r}; sizes: {['default', *sizes]}")
        base = deep_merge(base, sizes[size])
    raw = deep_merge(deep_merge(base, rest), dict(overrides))
    raw["size"] = size
    return DemoConfig.from_dict(raw, where=where)
