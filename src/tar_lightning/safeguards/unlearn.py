"""The TAR paper's output-space stage-1 baselines, Max-Entropy and Min-Posterior (Tamirisa et al. 2025, Table 1).

Both fine-tune the whole model on two streams, next-token CE on retain text keeping capability and a forget loss on
forget-domain text removing the knowledge::

    L = retain_weight · CE(retain) + forget_weight · L_forget(forget)

- ``max_entropy``: ``L_forget`` = minus the mean predictive entropy over the forget text's positions
  (:func:`~tar_lightning.losses.max_entropy_loss`): every next-token distribution is pushed toward uniform.
- ``min_posterior``: ``L_forget`` = the mean over labelled forget positions of ``−log(1 − p(y_{t+1} | x_≤t))``
  (:func:`~tar_lightning.losses.min_posterior_loss`): the probability of every true next token is pushed toward
  0; positions whose ``log p`` is already below ``threshold`` (the reference's −15) add nothing.

Unlike the reference's baseline loops, the forget loss is taken on the forget batch's logits and the entropy
leaves padding out (``entropy_positions``, :func:`~tar_lightning.losses.entropy_position_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from torch import Tensor

from tar_lightning.base_module import (
    CausalLMModule,
    ModelArg,
    OptimizerFactory,
    SchedulerFactory,
    schedule_free_adamw,
)
from tar_lightning.common import is_number
from tar_lightning.errors import ConfigError
from tar_lightning.losses import (
    ENTROPY_POSITIONS,
    MIN_POSTERIOR_THRESHOLD,
    causal_lm_loss,
    max_entropy_loss,
    min_posterior_loss,
)
from tar_lightning.losses.posterior import THRESHOLD_EXPECTED, is_threshold

__all__ = ["FORGET_LOSSES", "UnlearnModule", "check_unlearn_options"]

#: The forget losses of :class:`UnlearnModule` (each the name of a baseline and of its logged term).
FORGET_LOSSES = ("max_entropy", "min_posterior")

#: option -> (whether a value is valid, what is expected): the one check of :class:`UnlearnModule`'s options and
#: the demo's ``max_entropy`` / ``min_posterior`` sections.
_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "forget_loss": (lambda v: isinstance(v, str) and v in FORGET_LOSSES, f"one of {list(FORGET_LOSSES)}"),
    "forget_weight": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "retain_weight": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "entropy_positions": (lambda v: isinstance(v, str) and v in ENTROPY_POSITIONS, f"one of {list(ENTROPY_POSITIONS)}"),
    "threshold": (is_threshold, THRESHOLD_EXPECTED),
}


def check_unlearn_options(where: str = "UnlearnModule", **options: Any) -> None:
    """Checks the given options of :class:`UnlearnModule` (any of ``forget_loss``, ``forget_weight``,
    ``retain_weight``, ``entropy_positions``, ``threshold``).

    Args:
        where: what the errors name: ``<where>.<key>=<value>`` (``UnlearnModule``, or a demo section).
        options: the options to check, by name.

    Raises:
        ConfigError: the first invalid value, naming its key, the value and what is expected.
    """
    for key, value in options.items():
        valid, expected = _OPTIONS[key]
        if not valid(value):
            raise ConfigError(f"{where}.{key}={value!r}: expected {expected}")


class UnlearnModule(CausalLMModule):
    """Max-Entropy or Min-Posterior unlearning (the TAR paper's output-space stage-1 baselines, safeguards like
    :class:`~tar_lightning.safeguards.RandomMappingModule`), with automatic optimization. See the module docstring
    for the loss.

    Args:
        model: the model to safeguard (source string, ``ModelSource`` or module).
        optimizer: optimizer factory; schedule-free AdamW, lr 1e-5, 100 warmup (random mapping's) by default.
        lr_scheduler: optional LR schedule factory.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
        forget_stream: name of the forget-domain stream.
        retain_stream: name of the retain stream.
        forget_loss: ``"max_entropy"`` or ``"min_posterior"``; also the name of the logged term
            (``train/<forget_loss>``, next to ``train/retain_ce``).
        forget_weight: weight of the forget loss; >= 0.
        retain_weight: weight of the retain CE; >= 0.
        entropy_positions: ``max_entropy`` only: the forget positions whose entropy counts (``"attention"``: every
            non-padding position; ``"labels"``: those whose next token is labelled; ``"all"``: the reference's,
            padding included).
        threshold: ``min_posterior`` only: positions whose true next token has ``log p`` below it add nothing;
            a finite number <= 0, or ``None`` (``null``) for none.

    Raises:
        ConfigError: an unknown ``forget_loss``, a negative or non-finite weight, bad ``entropy_positions``, or a
            ``threshold`` that is neither ``None`` nor a finite number <= 0 (naming the key and the value).
    """

    default_optimizer = staticmethod(schedule_free_adamw(lr=1e-5, warmup_steps=100))

    def __init__(
        self,
        model: ModelArg,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        tokenizer: Any = None,
        forget_stream: str = "forget",
        retain_stream: str = "retain",
        forget_loss: str = "max_entropy",
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        entropy_positions: str = "attention",
        threshold: Optional[float] = MIN_POSTERIOR_THRESHOLD,
    ) -> None:
        check_unlearn_options(forget_loss=forget_loss, forget_weight=forget_weight, retain_weight=retain_weight,
                              entropy_positions=entropy_positions, threshold=threshold)
        super().__init__(model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer)
        self.forget_stream = forget_stream
        self.retain_stream = retain_stream
        self.forget_loss = forget_loss
        self.forget_weight = float(forget_weight)
        self.retain_weight = float(retain_weight)
        self.entropy_positions = entropy_positions
        self.threshold = None if threshold is None else float(threshold)
        self.save_init_hyperparameters(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer,
            forget_stream=forget_stream, retain_stream=retain_stream, forget_loss=forget_loss,
            forget_weight=forget_weight, retain_weight=retain_weight, entropy_positions=entropy_positions,
            threshold=threshold,
        )

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches per step for each data stream (read by the data module)."""
        return {self.retain_stream: 1, self.forget_stream: 1}

    def forget_term(self, logits: Tensor, forget: dict[str, Tensor]) -> Tensor:
        """The unweighted forget loss of the forget batch's ``[B, T, V]`` logits (batch: ``input_ids``,
        ``attention_mask``, ``labels``)."""
        if self.forget_loss == "max_entropy":
            return max_entropy_loss(logits, forget["attention_mask"], forget.get("labels"),
                                    positions=self.entropy_positions)
        return min_posterior_loss(logits, forget["labels"], threshold=self.threshold)

    def unlearn_losses(self, forget: dict[str, Tensor], retain: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one forget and one retain batch (``input_ids``, ``attention_mask``, ``labels``: ``[B, T]``).

        Returns:
            ``(loss, parts)``: the 0-dim fp32 loss and the detached unweighted terms ``"retain_ce"`` and
            ``<forget_loss>``.
        """
        out_r = self.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], use_cache=False)
        ce = causal_lm_loss(out_r.logits, retain["labels"])
        out_f = self.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], use_cache=False)
        term = self.forget_term(out_f.logits, forget)
        loss = self.retain_weight * ce + self.forget_weight * term
        return loss, {"retain_ce": ce.detach(), self.forget_loss: term.detach()}

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        retain = self.first_micro_batch(batch, self.retain_stream)
        loss, parts = self.unlearn_losses(self.first_micro_batch(batch, self.forget_stream), retain)
        self.log_losses(loss, parts, batch_size=retain["input_ids"].shape[0])
        return loss
