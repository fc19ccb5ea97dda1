"""Optimizers and learning-rate schedules for adversaries, built by name.

Every optimizer and schedule here is a library implementation (torch, ``schedulefree``, ``bitsandbytes``,
transformers) except ``exponential_warmup``, which no library offers. All schedules are ``LambdaLR``-style
*multipliers* of the optimizer's base LR: the reference code returned absolute LRs as multipliers, so its
warmup ran at about lr² (a multiplier of lr·s/W on a base LR of lr gives lr²·s/W at step s of W).

Optimizers (``OPTIMIZERS``):

- ``adamw``: ``torch.optim.AdamW``.
- ``adam``: ``torch.optim.Adam``.
- ``sgd``: ``torch.optim.SGD`` with ``momentum=0.9`` unless overridden.
- ``sgd_nesterov``: ``torch.optim.SGD`` with ``momentum=0.9`` and ``nesterov=True``.
- ``adagrad``: ``torch.optim.Adagrad``.
- ``adadelta``: ``torch.optim.Adadelta``.
- ``schedule_free_adamw``: ``schedulefree.AdamWScheduleFree``; its warmup is internal (``warmup_steps``)
  and it must be in ``train()`` mode while stepping and in ``eval()`` mode while evaluating.
- ``adamw_8bit``: ``bitsandbytes.optim.AdamW8bit`` (the ``quant`` extra).

Schedules (``SCHEDULES``), with ``W`` = warmup steps and ``T`` = total steps; step ``t`` counts scheduler
steps, so the LR used by the first optimizer step is the multiplier at ``t = 0``:

- ``constant``: multiplier 1 (transformers ``get_constant_schedule``).
- ``linear_warmup``: ``t / W`` for ``t < W``, then 1 (transformers ``get_constant_schedule_with_warmup``).
- ``warmup_cosine``: linear warmup, then cosine decay to 0 at ``T`` (transformers
  ``get_cosine_schedule_with_warmup``), or to a floor given by ``min_lr`` (absolute) or ``min_lr_ratio``
  (of the base LR) (transformers ``get_cosine_with_min_lr_schedule_with_warmup``). ``num_cycles`` (default
  0.5, a half cosine) sets the phase reached at ``T``: the reference's ``CosineAnnealingLR`` with
  ``T_max = 4 * steps`` is ``num_cycles=0.125``.
- ``cosine_restarts``: linear warmup, then ``num_cycles`` cosine cycles from the base LR to 0 with hard
  restarts (transformers ``get_cosine_with_hard_restarts_schedule_with_warmup``). Default ``num_cycles``:
  ``max(1, round((T - W) / 100))``, i.e. cycles of about 100 steps as in the reference's SGDR
  (``t_initial=100``); unlike the reference it decays to 0, not to 5e-6.
- ``exponential_warmup``: ``(1 - exp(-rate * t / W)) / (1 - exp(-rate))`` for ``t < W``, then 1
  (``torch.optim.lr_scheduler.LambdaLR``; ``rate`` defaults to 5). The ramp is fast at first and flattens
  towards the base LR; it is 0 at ``t = 0`` and exactly 1 at ``t = W``, like the linear warmup.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import schedulefree
import torch
import transformers
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from tar_lightning.common import is_int
from tar_lightning.errors import ConfigError

# The schedules are transformers' own, called as ``transformers.get_*``: transformers imports its optimization
# module on the first such call, not at import (that module pulls in peft and bitsandbytes when installed).

if TYPE_CHECKING:
    from tar_lightning.adversaries.config import AdversaryConfig

OPTIMIZERS: tuple[str, ...] = (
    "adamw",
    "adam",
    "sgd",
    "sgd_nesterov",
    "adagrad",
    "adadelta",
    "schedule_free_adamw",
    "adamw_8bit",
)

SCHEDULES: tuple[str, ...] = (
    "constant",
    "linear_warmup",
    "warmup_cosine",
    "cosine_restarts",
    "exponential_warmup",
)

# Keyword arguments each schedule accepts beyond (optimizer, total_steps, warmup_steps).
SCHEDULE_KWARGS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear_warmup": (),
    "warmup_cosine": ("num_cycles", "min_lr", "min_lr_ratio"),
    "cosine_restarts": ("num_cycles",),
    "exponential_warmup": ("rate",),
}

# Optimizer arguments set from the adversary's own fields, never through optimizer_kwargs.
_MANAGED_KWARGS: dict[str, str] = {
    "params": "the parameters are chosen by the runner",
    "lr": "set the adversary's lr",
    "weight_decay": "set the adversary's weight_decay",
}

_SGD_MOMENTUM = 0.9


def optimizer_class(name: str) -> type[Optimizer]:
    """Returns the optimizer class behind an optimizer name.

    Args:
        name: One of ``OPTIMIZERS``.

    Returns:
        The class (imported lazily for ``adamw_8bit``).

    Raises:
        ConfigError: If the name is unknown, or ``adamw_8bit`` is asked for without bitsandbytes installed.
    """
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adam":
        return torch.optim.Adam
    if name in ("sgd", "sgd_nesterov"):
        return torch.optim.SGD
    if name == "adagrad":
        return torch.optim.Adagrad
    if name == "adadelta":
        return torch.optim.Adadelta
    if name == "schedule_free_adamw":
        return schedulefree.AdamWScheduleFree
    if name == "adamw_8bit":
        try:
            import bitsandbytes.optim as bnb_optim  # optional dependency: the [quant] extra
        except ImportError as err:
            raise ConfigError(
                "optimizer 'adamw_8bit' needs bitsandbytes: install the `quant` extra "
                "(pip install 'tar_lightning[quant]')"
            ) from err
        return bnb_optim.AdamW8bit
    raise ConfigError(f"optimizer {name!r} is unknown; expected one of {list(OPTIMIZERS)}")


def check_optimizer_kwargs(name: str, kwargs: Mapping[str, Any], *, allow_warmup: bool = False) -> None:
    """Checks extra optimizer keyword arguments against the optimizer class's signature.

    Args:
        name: One of ``OPTIMIZERS``.
        kwargs: The extra keyword arguments (``optimizer_kwargs``).
        allow_warmup: Whether ``warmup_steps`` may appear (``build_optimizer`` passes the adversary's warmup
            to ``schedule_free_adamw`` this way; in ``optimizer_kwargs`` it is refused).

    Raises:
        ConfigError: If the name is unknown or a key is managed elsewhere or not accepted by the class.
    """
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"optimizer_kwargs must be a mapping, got {type(kwargs).__name__}")
    cls = optimizer_class(name)
    parameters = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = sorted(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)
    for key in kwargs:
        if key in _MANAGED_KWARGS:
            raise ConfigError(f"optimizer_kwargs key {key!r} is not allowed: {_MANAGED_KWARGS[key]}")
        if key == "nesterov" and name in ("sgd", "sgd_nesterov"):
            raise ConfigError(
                "optimizer_kwargs key 'nesterov' is not allowed: choose optimizer 'sgd' or 'sgd_nesterov'"
            )
        if key == "warmup_steps" and name == "schedule_free_adamw" and not allow_warmup:
            raise ConfigError(
                "optimizer_kwargs key 'warmup_steps' is not allowed: set the adversary's warmup_steps "
                "(schedule_free_adamw receives it as its internal warmup)"
            )
        if not accepts_any and key not in parameters:
            raise ConfigError(
                f"optimizer_kwargs key {key!r} is not accepted by {cls.__module__}.{cls.__qualname__} "
                f"(optimizer {name!r}); valid keys: {[k for k in valid if k not in _MANAGED_KWARGS]}"
            )


def check_schedule(name: str, kwargs: Mapping[str, Any]) -> None:
    """Checks a schedule name and its keyword arguments.

    Args:
        name: One of ``SCHEDULES``.
        kwargs: The schedule's extra keyword arguments (``schedule_kwargs``).

    Raises:
        ConfigError: If the name is unknown, a key is not accepted, or a value is out of range.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule {name!r} is unknown; expected one of {list(SCHEDULES)}")
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"schedule_kwargs must be a mapping, got {type(kwargs).__name__}")
    allowed = SCHEDULE_KWARGS[name]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(
                f"schedule_kwargs key {key!r} is not accepted by schedule {name!r}; valid keys: {list(allowed)}"
            )

    def number(key: str) -> float:
        value = kwargs[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"schedule_kwargs {key!r} must be a finite number, got {value!r}")
        return float(value)

    if "min_lr" in kwargs and "min_lr_ratio" in kwargs:
        raise ConfigError("schedule_kwargs: give at most one of 'min_lr' and 'min_lr_ratio'")
    if "min_lr" in kwargs and number("min_lr") < 0:
        raise ConfigError(f"schedule_kwargs 'min_lr' must be >= 0, got {kwargs['min_lr']!r}")
    if "min_lr_ratio" in kwargs and not 0 <= number("min_lr_ratio") <= 1:
        raise ConfigError(f"schedule_kwargs 'min_lr_ratio' must be in [0, 1], got {kwargs['min_lr_ratio']!r}")
    if "rate" in kwargs and number("rate") <= 0:
        raise ConfigError(f"schedule_kwargs 'rate' must be > 0, got {kwargs['rate']!r}")
    if "num_cycles" in kwargs:
        cycles = kwargs["num_cycles"]
        if name == "cosine_restarts":
            if not is_int(cycles) or cycles < 1:
                raise ConfigError(f"schedule_kwargs 'num_cycles' must be an integer >= 1, got {cycles!r}")
        elif number("num_cycles") <= 0:
            raise ConfigError(f"schedule_kwargs 'num_cycles' must be > 0, got {cycles!r}")


def build_optimizer(
    name: str, params: Iterable, lr: float, weight_decay: float = 0.0, **kwargs: Any
) -> Optimizer:
    """Builds an optimizer by name.

    Args:
        name: One of ``OPTIMIZERS``.
        params: Parameters or parameter groups, as for any torch optimizer.
        lr: Learning rate.
        weight_decay: Weight decay (decoupled for the AdamW variants, L2 for the others, as each class does).
        **kwargs: Extra arguments for the optimizer class (``betas``, ``eps``, ``momentum``, ...);
            ``schedule_free_adamw`` also takes ``warmup_steps`` here.

    Returns:
        The optimizer. A ``schedule_free_adamw`` optimizer is returned in its initial mode: call ``.train()``
        before stepping (``build_adversary_optimizer`` does).

    Raises:
        ConfigError: If the name or a keyword is unknown, bitsandbytes is missing for ``adamw_8bit``, or the
            optimizer class rejects a value.
    """
    check_optimizer_kwargs(name, kwargs, allow_warmup=True)
    cls = optimizer_class(name)
    options = dict(kwargs)
    if name in ("sgd", "sgd_nesterov"):
        options.setdefault("momentum", _SGD_MOMENTUM)
        options["nesterov"] = name == "sgd_nesterov"
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, **options)
    except ValueError as err:
        raise ConfigError(f"optimizer {name!r}: {err}") from err


def _exponential_warmup_multiplier(step: int, *, warmup_steps: int, rate: float) -> float:
    if step >= warmup_steps:
        return 1.0
    return (1.0 - math.exp(-rate * step / warmup_steps)) / (1.0 - math.exp(-rate))


def build_scheduler(
    name: str, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, **kwargs: Any
) -> LRScheduler:
    """Builds a learning-rate schedule by name; call its ``step()`` after every optimizer step.

    Args:
        name: One of ``SCHEDULES`` (see the module docstring for each curve).
        optimizer: The optimizer whose base LR the schedule multiplies.
        total_steps: Number of optimizer steps the schedule spans.
        warmup_steps: Warmup length in steps (ignored by ``constant``).
        **kwargs: Schedule options: ``num_cycles``, ``min_lr``, ``min_lr_ratio`` (``warmup_cosine``);
            ``num_cycles`` (``cosine_restarts``); ``rate`` (``exponential_warmup``).

    Returns:
        A ``LambdaLR`` whose multiplier at step ``t`` is the schedule's value.

    Raises:
        ConfigError: If the name or a keyword is unknown, a value is out of range, ``total_steps < 1``,
            ``warmup_steps < 0``, or a non-constant schedule has ``warmup_steps >= total_steps``.
    """
    check_schedule(name, kwargs)
    if not is_int(total_steps) or total_steps < 1:
        raise ConfigError(f"schedule {name!r}: total_steps must be an integer >= 1, got {total_steps!r}")
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise ConfigError(f"schedule {name!r}: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if name == "constant":
        return transformers.get_constant_schedule(optimizer)
    if warmup_steps >= total_steps:
        raise ConfigError(
            f"schedule {name!r}: warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})"
        )
    if name == "linear_warmup":
        return transformers.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    if name == "warmup_cosine":
        num_cycles = float(kwargs.get("num_cycles", 0.5))
        if "min_lr" in kwargs or "min_lr_ratio" in kwargs:
            return transformers.get_cosine_with_min_lr_schedule_with_warmup(
                optimizer,
                num_warmup_steps=warmup_steps,
                num_training_steps=total_steps,
                num_cycles=num_cycles,
                min_lr=kwargs.get("min_lr"),
                min_lr_rate=kwargs.get("min_lr_ratio"),
            )
        return transformers.get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, num_cycles=num_cycles
        )
    if name == "cosine_restarts":
        num_cycles = kwargs.get("num_cycles", max(1, round((total_steps - warmup_steps) / 100)))
        return transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, num_cycles=num_cycles
        )
    # exponential_warmup: no library has it.
    multiplier = functools.partial(
        _exponential_warmup_multiplier, warmup_steps=warmup_steps, rate=float(kwargs.get("rate", 5.0))
    )
    return LambdaLR(optimizer, multiplier)


def build_adversary_optimizer(
    config: AdversaryConfig, params: Iterable, lr: float, total_steps: int
) -> tuple[Optimizer, Optional[LRScheduler]]:
    """Builds a fresh optimizer and schedule for one adversary run.

    Args:
        config: The adversary (validated here).
        params: The parameters it trains (all weights, or the LoRA adapters).
        lr: The learning rate of this run (e.g. from ``config.sample_lr``).
        total_steps: The run's number of optimizer steps (TAR's inner steps, or the attack's ``steps``).

    Returns:
        ``(optimizer, scheduler)``; ``scheduler`` is ``None`` for ``constant`` and for
        ``schedule_free_adamw``, whose warmup is internal. A ``schedule_free_adamw`` optimizer is already in
        ``train()`` mode; put it in ``eval()`` mode before evaluating the attacked weights.

    Raises:
        ConfigError: If the configuration is invalid or the schedule does not fit ``total_steps``.
    """
    config.validate()
    if config.optimizer == "schedule_free_adamw":
        if config.warmup_steps >= total_steps:
            raise ConfigError(
                f"adversary {config.name!r}: warmup_steps ({config.warmup_steps}) must be smaller than "
                f"the run's total steps ({total_steps})"
            )
        optimizer = build_optimizer(
            config.optimizer,
            params,
            lr,
            config.weight_decay,
            warmup_steps=config.warmup_steps,
            **config.optimizer_kwargs,
        )
        optimizer.train()
        return optimizer, None
    optimizer = build_optimizer(config.optimizer, params, lr, config.weight_decay, **config.optimizer_kwargs)
    if config.schedule == "constant":
        return optimizer, None
    try:
        scheduler = build_scheduler(
            config.schedule, optimizer, total_steps, config.warmup_steps, **config.schedule_kwargs
        )
    except ConfigError as err:
        raise ConfigError(f"adversary {config.name!r}: {err}") from None
    return optimizer, scheduler
