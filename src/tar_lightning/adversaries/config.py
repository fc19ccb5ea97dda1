"""What an adversary is: data stream, method, optimizer, learning rate, schedule, length.

One ``AdversaryConfig`` describes an attack: full or LoRA fine-tuning of the weights, a bounded learned
perturbation of the input embeddings (``embedding``) or of one decoder layer's residual stream (``latent``), or
refusal-direction ablation (``refusal_ablation``); see ``METHODS``. TAR samples train-time adversaries (full or
LoRA) from a list of them (``sample_adversary``) in every outer step; the red team runs test-time adversaries
from YAML suites (``AdversaryConfig.from_dict``). Both go through the same runner, so a train-time and a
test-time attack with the same configuration are the same attack.

The classes are plain dataclasses with simple annotations so that jsonargparse/LightningCLI can build them
from YAML. Every random choice (adversary, learning rate, switch point) draws only from a ``torch.Generator``
the caller passes, so ranks seeded alike make identical choices without communicating.
"""

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from tar_lightning.adversaries.optim import (
    OPTIMIZERS,
    SCHEDULES,
    check_optimizer_kwargs,
    check_schedule,
)
from tar_lightning.common import is_int, is_number
from tar_lightning.errors import ConfigError
from tar_lightning.schema import from_mapping

__all__ = [
    "ACTIVATION_METHODS",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "AdversaryConfig",
    "EmbeddingAttackConfig",
    "LatentAttackConfig",
    "LoRAConfig",
    "RefusalAblationConfig",
    "SwitchConfig",
    "check_lora_targets",
    "sample_adversary",
]

#: every ``AdversaryConfig.method``: weight fine-tuning (``full``, ``lora``), activation attacks that leave the
#: weights alone (``embedding``, ``latent``), and the weight edit ``refusal_ablation``
METHODS = ("full", "lora", "embedding", "latent", "refusal_ablation")
#: the methods that add a learned perturbation to activations through a forward hook (no weight changes)
ACTIVATION_METHODS = ("embedding", "latent")

_DEFAULT_BETA = (6.0, 3.0)
_QUANTIZATIONS = ("nf4", "fp4", "int8")


@dataclass
class LoRAConfig:
    """LoRA adapters for an adversary with ``method: lora``.

    Attributes:
        rank: Adapter rank r.
        alpha: Scaling numerator (the update is scaled by alpha / rank).
        dropout: Dropout on the adapter input.
        targets: ``"all-linear"`` (every linear layer except the output head), or module-name suffixes such as
            ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]``.
        quantize_base: Load the attacked base weights quantized with bitsandbytes before adding the adapters
            (QLoRA): ``"nf4"`` or ``"fp4"`` (4-bit) or ``"int8"``; ``None`` keeps them as they are.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Union[str, list[str]] = "all-linear"
    quantize_base: Optional[Literal["nf4", "fp4", "int8"]] = None

    def validate(self, prefix: str = "") -> "LoRAConfig":
        """Checks the values.

        Args:
            prefix: Text put before every error message (e.g. ``"adversary 'w16': "``).

        Returns:
            self.

        Raises:
            ConfigError: Naming the first invalid field.
        """
        if not is_int(self.rank) or self.rank < 1:
            raise ConfigError(f"{prefix}lora.rank must be an integer >= 1, got {self.rank!r}")
        if not is_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"{prefix}lora.alpha must be a number > 0, got {self.alpha!r}")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.targets
        if isinstance(targets, str):
            if targets != "all-linear":
                raise ConfigError(
                    f"{prefix}lora.targets must be 'all-linear' or a list of module-name suffixes, got {targets!r}"
                )
        elif (
            not isinstance(targets, (list, tuple))
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ConfigError(
                f"{prefix}lora.targets must be 'all-linear' or a non-empty list of module-name suffixes, "
                f"got {targets!r}"
            )
        if self.quantize_base is not None and self.quantize_base not in _QUANTIZATIONS:
            raise ConfigError(
                f"{prefix}lora.quantize_base {self.quantize_base!r} is unknown; expected one of "
                f"{list(_QUANTIZATIONS)} or null"
            )
        return self


@dataclass
class SwitchConfig:
    """A retain→forget switch: the first M steps train on ``retain_stream``, the rest on the adversary's data.

    Exactly one of ``beta`` and ``fraction`` sets M. Because ``beta`` has a default, giving ``fraction`` while
    ``beta`` keeps its default value replaces the default; only a non-default ``beta`` together with a
    ``fraction`` is a conflict (``from_dict`` also refuses both keys written out).

    Attributes:
        retain_stream: Name of the data stream used before the switch.
        beta: ``(a, b)``: M = floor(Beta(a, b) * steps), drawn afresh per trajectory (the paper: (6, 3)).
        fraction: Fixed M = floor(fraction * steps), e.g. 0.6 for the red team's R→F attacks.
    """

    retain_stream: str = "retain_domain"
    beta: Optional[tuple[float, float]] = _DEFAULT_BETA
    fraction: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.beta, list):
            self.beta = tuple(self.beta)
        if self.fraction is not None and self.beta == _DEFAULT_BETA:
            self.beta = None

    def validate(self, prefix: str = "") -> "SwitchConfig":
        """Checks the values.

        Args:
            prefix: Text put before every error message.

        Returns:
            self.

        Raises:
            ConfigError: Naming the first invalid field.
        """
        if not isinstance(self.retain_stream, str) or not self.retain_stream:
            raise ConfigError(
                f"{prefix}switch.retain_stream must be a non-empty string, got {self.retain_stream!r}"
            )
        if (self.beta is None) == (self.fraction is None):
            raise ConfigError(
                f"{prefix}switch: give exactly one of switch.beta and switch.fraction "
                f"(got beta={self.beta!r}, fraction={self.fraction!r})"
            )
        if self.fraction is not None and (not is_number(self.fraction) or not 0 < self.fraction < 1):
            raise ConfigError(f"{prefix}switch.fraction must be in (0, 1), got {self.fraction!r}")
        if self.beta is not None and (
            not isinstance(self.beta, (tuple, list))
            or len(self.beta) != 2
            or not all(is_number(x) and x > 0 for x in self.beta)
        ):
            raise ConfigError(f"{prefix}switch.beta must be two numbers > 0 (a, b), got {self.beta!r}")
        return self


def _check_bound(spec, key: str, prefix: str) -> None:
    if not is_number(spec.epsilon) or not spec.epsilon > 0 or not math.isfinite(spec.epsilon):
        raise ConfigError(f"{prefix}{key}.epsilon must be a finite number > 0, got {spec.epsilon!r}")
    if not isinstance(spec.relative, bool):
        raise ConfigError(f"{prefix}{key}.relative must be true or false, got {spec.relative!r}")


def _check_layer(layer: Any, key: str, prefix: str) -> None:
    if layer is not None and not is_int(layer):
        raise ConfigError(
            f"{prefix}{key}.layer must be an integer (a decoder layer; negative counts from the end) or null, "
            f"got {layer!r}"
        )


@dataclass
class EmbeddingAttackConfig:
    """An input-embedding attack (``method: embedding``): a learned perturbation of the token embeddings.

    The perturbation is added to the output of the model's input-embedding module, is trained with the
    adversary's optimizer/lr/schedule on the LM loss of its data stream, and is projected onto its L2 ball after
    every optimizer step. The weights are never changed.

    Attributes:
        epsilon: the L2 bound. With ``relative`` the radius is ``epsilon`` times the mean L2 norm of the
            (unperturbed) token embeddings over the non-padding tokens of the attack's first batch, measured
            once when the attack starts; otherwise ``epsilon`` is the radius itself.
        relative: read ``epsilon`` relative to the measured mean norm (default) or as an absolute radius.
        scope: ``universal``: one vector δ added at every position (``hidden_size`` numbers, ``‖δ‖₂ <= radius``);
            ``token``: one vector per token id, added wherever that token occurs (a bounded edit of every
            embedding row, ``vocab × hidden`` numbers, each row ``<= radius``; stronger and larger).
    """

    epsilon: float = 0.5
    relative: bool = True
    scope: Literal["universal", "token"] = "universal"

    def validate(self, prefix: str = "") -> "EmbeddingAttackConfig":
        """Checks the values; ``prefix`` goes before every message.

        Raises:
            ConfigError: naming the invalid key.
        """
        _check_bound(self, "embedding", prefix)
        if self.scope not in ("universal", "token"):
            raise ConfigError(f"{prefix}embedding.scope must be 'universal' or 'token', got {self.scope!r}")
        return self


@dataclass
class LatentAttackConfig:
    """A latent (residual-stream) attack (``method: latent``): one learned vector added to the output of a
    decoder layer at every position, bounded and trained like :class:`EmbeddingAttackConfig`.

    Attributes:
        layer: the decoder layer whose output (the residual stream after it) is perturbed; negative counts from
            the end (-1 is the last layer); ``null``: the middle layer, index ``num_layers // 2``.
        epsilon: the L2 bound; relative to the mean norm of that layer's output over the non-padding tokens of
            the first batch (``relative``), or absolute.
        relative: see ``epsilon``.
    """

    layer: Optional[int] = None
    epsilon: float = 0.5
    relative: bool = True

    def validate(self, prefix: str = "") -> "LatentAttackConfig":
        """Checks the values; ``prefix`` goes before every message.

        Raises:
            ConfigError: naming the invalid key.
        """
        _check_layer(self.layer, "latent", prefix)
        _check_bound(self, "latent", prefix)
        return self


@dataclass
class RefusalAblationConfig:
    """Refusal-direction ablation (``method: refusal_ablation``, Arditi et al. 2024).

    The refusal direction r is the difference between the mean activations of harmful prompts (the adversary's
    ``data`` stream) and of harmless prompts (the ``harmless`` stream), taken at the output of decoder layer
    ``layer`` at the token ``position`` counted from the end of each prompt, normalised. Every weight that writes
    into the residual stream is then orthogonalised against r. The attack's ``steps`` are the batches used to
    estimate the two means: the first half reads the harmless stream, the rest the harmful one (an adversary
    with this method gets ``switch: {retain_stream: <harmless>, fraction: 0.5}`` unless it sets its own switch on
    the same stream), so ``steps`` must be at least 2.

    Attributes:
        harmless: name of the data stream of harmless prompts (e.g. Alpaca instructions).
        layer: the decoder layer whose output is read; negative counts from the end; ``null``: the middle layer,
            index ``num_layers // 2``.
        position: the token read, counted from the end of the prompt: -1 is the last prompt token (for
            chat-templated prompts, the last token of the generation prompt, just before the response).
    """

    harmless: str = "harmless"
    layer: Optional[int] = None
    position: int = -1

    def validate(self, prefix: str = "") -> "RefusalAblationConfig":
        """Checks the values; ``prefix`` goes before every message.

        Raises:
            ConfigError: naming the invalid key.
        """
        if not isinstance(self.harmless, str) or not self.harmless:
            raise ConfigError(
                f"{prefix}refusal_ablation.harmless must name the data stream of harmless prompts, "
                f"got {self.harmless!r}"
            )
        _check_layer(self.layer, "refusal_ablation", prefix)
        if not is_int(self.position) or self.position >= 0:
            raise ConfigError(
                f"{prefix}refusal_ablation.position must be a negative integer (-1 = the last prompt token), "
                f"got {self.position!r}"
            )
        return self


@dataclass
class AdversaryConfig:
    """One adversary (a train-time adversary of TAR or an attack of the red team).

    Attributes:
        name: Identifier used in logs, reports and error messages.
        data: Name of the data stream the adversary trains on (e.g. ``forget``, ``retain_domain``); for
            ``refusal_ablation``, the harmful prompts.
        method: one of ``METHODS``: ``full`` (all weights), ``lora`` (adapters from ``lora``), ``embedding``
            (a bounded perturbation of the input embeddings, ``embedding``), ``latent`` (of one decoder layer's
            output, ``latent``), ``refusal_ablation`` (weights orthogonalised against the refusal direction,
            ``refusal_ablation``). Only ``full`` and ``lora`` can be TAR's train-time adversaries.
        lora: LoRA settings, used when ``method`` is ``lora``.
        embedding: settings of ``method: embedding``.
        latent: settings of ``method: latent``.
        refusal_ablation: settings of ``method: refusal_ablation`` (the optimizer fields are not used).
        optimizer: One of ``OPTIMIZERS``: adamw, adam, sgd (momentum 0.9), sgd_nesterov, adagrad, adadelta,
            schedule_free_adamw, adamw_8bit.
        optimizer_kwargs: Extra arguments for the optimizer class (betas, eps, momentum, ...).
        lr: A learning rate, or a list of them to choose from uniformly per trajectory/run.
        weight_decay: Weight decay passed to the optimizer.
        schedule: One of ``SCHEDULES``: constant, linear_warmup, warmup_cosine, cosine_restarts,
            exponential_warmup (curves in ``tar_lightning.adversaries.optim``).
        warmup_steps: Warmup length; for schedule_free_adamw the optimizer's internal warmup.
        schedule_kwargs: Extra schedule options (``num_cycles``, ``min_lr``, ``min_lr_ratio``, ``rate``).
        switch: Optional retain→forget switch.
        probability: Relative sampling weight among the adversaries of one family.
        steps: Attack length (red team); TAR uses its ``inner_steps`` instead.
        batch_size: Per-device batch size (red team); ``None`` uses the data module's.
    """

    name: str = "adamw"
    data: str = "forget"
    method: Literal["full", "lora", "embedding", "latent", "refusal_ablation"] = "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    embedding: EmbeddingAttackConfig = field(default_factory=EmbeddingAttackConfig)
    latent: LatentAttackConfig = field(default_factory=LatentAttackConfig)
    refusal_ablation: RefusalAblationConfig = field(default_factory=RefusalAblationConfig)
    optimizer: str = "adamw"
    optimizer_kwargs: dict = field(default_factory=dict)
    lr: Union[float, list[float]] = 2e-5
    weight_decay: float = 0.01
    schedule: str = "constant"
    warmup_steps: int = 0
    schedule_kwargs: dict = field(default_factory=dict)
    switch: Optional[SwitchConfig] = None
    probability: float = 1.0
    steps: Optional[int] = None
    batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        # Python users may write nested settings as plain dicts, as in YAML.
        where = f"adversary {self.name!r}"
        if isinstance(self.lora, Mapping):
            self.lora = from_mapping(LoRAConfig, self.lora, where, "lora")
        if isinstance(self.switch, Mapping):
            _check_switch_keys(self.switch, where)
            self.switch = from_mapping(SwitchConfig, self.switch, where, "switch")
        for key, cls in (("embedding", EmbeddingAttackConfig), ("latent", LatentAttackConfig),
                         ("refusal_ablation", RefusalAblationConfig)):
            if isinstance(getattr(self, key), Mapping):
                setattr(self, key, from_mapping(cls, getattr(self, key), where, key))
        self._derive_harmless_switch()

    def _derive_harmless_switch(self) -> None:
        # Refusal ablation reads its harmless prompts as the retain stream of a switch at half the steps, so
        # every caller that loads an adversary's streams (data + switch.retain_stream) loads them too.
        spec = self.refusal_ablation
        if (
            self.method == "refusal_ablation"
            and self.switch is None
            and isinstance(spec, RefusalAblationConfig)
            and isinstance(spec.harmless, str)
            and spec.harmless
        ):
            self.switch = SwitchConfig(retain_stream=spec.harmless, beta=None, fraction=0.5)

    def validate(self) -> "AdversaryConfig":
        """Checks every field and the combinations between them.

        Returns:
            self, so that ``AdversaryConfig.from_dict(d).validate()`` chains.

        Raises:
            ConfigError: Naming the adversary and the first invalid field, e.g. an unknown optimizer or
                schedule, an empty or non-positive ``lr``, a negative ``warmup_steps`` or one not below
                ``steps``, ``warmup_steps`` with the ``constant`` schedule, ``schedule_free_adamw`` with a
                schedule other than ``constant``, an ``optimizer_kwargs`` key the optimizer class does not
                accept, ``probability <= 0``, invalid ``lora`` or ``switch`` values.
        """
        prefix = f"adversary {self.name!r}: "
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"adversary: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"{prefix}data must be the name of a data stream, got {self.data!r}")
        if self.method not in METHODS:
            raise ConfigError(f"{prefix}method {self.method!r} is unknown; expected one of {list(METHODS)}")
        if not isinstance(self.lora, LoRAConfig):
            raise ConfigError(f"{prefix}lora must be a LoRAConfig, got {type(self.lora).__name__}")
        self.lora.validate(prefix)
        for key, cls in (("embedding", EmbeddingAttackConfig), ("latent", LatentAttackConfig),
                         ("refusal_ablation", RefusalAblationConfig)):
            value = getattr(self, key)
            if not isinstance(value, cls):
                raise ConfigError(f"{prefix}{key} must be a mapping of {cls.__name__} keys, got {value!r}")
            value.validate(prefix)
        if self.method in ACTIVATION_METHODS and self.optimizer == "schedule_free_adamw":
            raise ConfigError(
                f"{prefix}optimizer 'schedule_free_adamw' cannot drive method {self.method!r}: its evaluation point "
                "(an average of the iterates) is not projected onto the perturbation's L2 ball; use adamw, adam or sgd"
            )
        if self.method == "refusal_ablation":
            self._derive_harmless_switch()
            harmless = self.refusal_ablation.harmless
            if not isinstance(self.switch, SwitchConfig) or self.switch.retain_stream != harmless:
                raise ConfigError(
                    f"{prefix}switch.retain_stream must be refusal_ablation.harmless ({harmless!r}) for method "
                    "'refusal_ablation' (the first switch steps read the harmless prompts); leave switch unset"
                )
            if harmless == self.data:
                raise ConfigError(
                    f"{prefix}refusal_ablation.harmless ({harmless!r}) must differ from data, the harmful prompts"
                )
            if self.steps is not None and is_int(self.steps) and self.steps < 2:
                raise ConfigError(
                    f"{prefix}steps must be >= 2 for method 'refusal_ablation' (harmless and harmful batches), "
                    f"got {self.steps!r}"
                )

        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"{prefix}optimizer {self.optimizer!r} is unknown; expected one of {list(OPTIMIZERS)}"
            )
        if not isinstance(self.optimizer_kwargs, Mapping):
            raise ConfigError(f"{prefix}optimizer_kwargs must be a mapping, got {self.optimizer_kwargs!r}")
        # adamw_8bit's class is only needed to check extra keywords; a machine without bitsandbytes can
        # still validate a suite that it will not run.
        if self.optimizer_kwargs and (
            self.optimizer != "adamw_8bit" or importlib.util.find_spec("bitsandbytes") is not None
        ):
            try:
                check_optimizer_kwargs(self.optimizer, self.optimizer_kwargs)
            except ConfigError as err:
                raise ConfigError(f"{prefix}{err}") from None

        lrs = self.lr if isinstance(self.lr, (list, tuple)) else [self.lr]
        if not lrs:
            raise ConfigError(
                f"{prefix}lr is an empty list; give a learning rate or a non-empty list of them"
            )
        for value in lrs:
            if not is_number(value) or value <= 0:
                raise ConfigError(f"{prefix}lr must be a number > 0 or a list of them, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"{prefix}weight_decay must be a number >= 0, got {self.weight_decay!r}")

        try:
            check_schedule(self.schedule, self.schedule_kwargs)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"{prefix}warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.optimizer == "schedule_free_adamw" and self.schedule != "constant":
            raise ConfigError(
                f"{prefix}schedule {self.schedule!r} cannot be combined with optimizer 'schedule_free_adamw'; "
                "use schedule 'constant' and set warmup_steps (it becomes the optimizer's internal warmup)"
            )
        if self.schedule == "constant" and self.warmup_steps > 0 and self.optimizer != "schedule_free_adamw":
            raise ConfigError(
                f"{prefix}warmup_steps ({self.warmup_steps}) has no effect with schedule 'constant'; "
                "use schedule 'linear_warmup', 'exponential_warmup' or 'warmup_cosine'"
            )

        if self.steps is not None:
            if not is_int(self.steps) or self.steps < 1:
                raise ConfigError(f"{prefix}steps must be an integer >= 1 or null, got {self.steps!r}")
            if self.warmup_steps > 0 and self.warmup_steps >= self.steps:
                raise ConfigError(
                    f"{prefix}warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})"
                )
        if self.batch_size is not None and (not is_int(self.batch_size) or self.batch_size < 1):
            raise ConfigError(f"{prefix}batch_size must be an integer >= 1 or null, got {self.batch_size!r}")
        if not is_number(self.probability) or self.probability <= 0:
            raise ConfigError(f"{prefix}probability must be a number > 0, got {self.probability!r}")

        if self.switch is not None:
            if not isinstance(self.switch, SwitchConfig):
                raise ConfigError(f"{prefix}switch must be a SwitchConfig or null, got {self.switch!r}")
            self.switch.validate(prefix)
        return self

    def sample_lr(self, generator: torch.Generator) -> float:
        """Chooses this run's learning rate.

        Args:
            generator: Source of randomness; generators in the same state give the same choice.

        Returns:
            ``lr`` itself, or an element of the ``lr`` list chosen uniformly.
        """
        if not isinstance(self.lr, (list, tuple)):
            return float(self.lr)
        index = int(torch.randint(len(self.lr), (1,), generator=generator).item())
        return float(self.lr[index])

    def switch_point(self, steps: int, generator: torch.Generator) -> Optional[int]:
        """Chooses the step at which a retain→forget switch happens.

        Beta(a, b) is drawn by numpy's ``Generator.beta`` seeded from one draw of ``generator`` (torch's
        Beta distribution cannot take a generator), so the result depends only on ``generator``'s state.

        Args:
            steps: Length of the run.
            generator: Source of randomness.

        Returns:
            ``None`` without a switch; otherwise M in ``[0, steps]``: steps ``0..M-1`` use the retain stream.
            With ``fraction``, M = floor(fraction * steps) and ``generator`` is not used.
        """
        if self.switch is None:
            return None
        if self.switch.fraction is not None:
            # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
            return min(steps, math.floor(self.switch.fraction * steps + 1e-9))
        a, b = self.switch.beta
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        x = float(np.random.default_rng(seed).beta(a, b))
        return min(steps, max(0, math.floor(x * steps)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> "AdversaryConfig":
        """Builds an adversary from plain data (a YAML mapping), nested dataclasses included.

        Numbers written as strings (YAML 1.1 reads ``2e-5`` as a string) are converted. The result is not
        validated: call ``.validate()``.

        Args:
            d: Mapping of field names to values; ``lora`` and ``switch`` may be mappings.
            where: Location for error messages, e.g. ``"recipes/redteam/weaponization.yaml, attacks[3]"``.

        Returns:
            The configuration.

        Raises:
            ConfigError: If a key is unknown (the message lists the valid keys) or a value has the wrong type.
        """
        label = "adversary"
        if isinstance(d, Mapping) and "name" in d:
            label = f"adversary {d['name']!r}"
        if where:
            label = f"{label} ({where})"
        if isinstance(d, Mapping) and isinstance(d.get("switch"), Mapping):
            _check_switch_keys(d["switch"], label)
        return from_mapping(cls, d, label)


def _check_switch_keys(switch: Mapping, label: str) -> None:
    # SwitchConfig drops its default beta when a fraction is given, so both keys written out are caught here
    if switch.get("beta") is not None and switch.get("fraction") is not None:
        raise ConfigError(f"{label}: give exactly one of switch.beta and switch.fraction, not both")


def sample_adversary(adversaries: list[AdversaryConfig], generator: torch.Generator) -> int:
    """Chooses one adversary with probability proportional to its ``probability``.

    Args:
        adversaries: The family to choose from.
        generator: Source of randomness; generators in the same state give the same choice.

    Returns:
        The index of the chosen adversary.

    Raises:
        ConfigError: If the list is empty or a probability is not a positive number.
    """
    if not adversaries:
        raise ConfigError("adversaries: the list is empty; give at least one adversary")
    weights = []
    for adversary in adversaries:
        if not is_number(adversary.probability) or adversary.probability <= 0:
            raise ConfigError(
                f"adversary {adversary.name!r}: probability must be a number > 0, got {adversary.probability!r}"
            )
        weights.append(float(adversary.probability))
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator).item())


def check_lora_targets(model: torch.nn.Module, adversaries: list["AdversaryConfig"]) -> None:
    """Check, before any training, that every listed LoRA target of every LoRA adversary names a module.

    A target matches a module whose name equals it or ends with ``.<target>`` (as peft matches them);
    ``all-linear`` always matches. Raises :class:`ConfigError` naming the adversary, the targets that match
    nothing and the linear-layer names that exist.
    """
    names = [name for name, _ in model.named_modules() if name]
    for adversary in adversaries:
        if adversary.method != "lora" or isinstance(adversary.lora.targets, str):
            continue
        missing = [t for t in adversary.lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and n})
            raise ConfigError(
                f"adversary {adversary.name!r}: lora.targets {missing} match no module of the "
                f"{type(model).__name__}; linear layers are named {linear} (or use 'all-linear')"
            )
