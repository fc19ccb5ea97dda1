"""Plain supervised fine-tuning over named data streams: :class:`SFTModule`.

The loss of a step is the weighted sum of the next-token cross-entropies of the streams, each on its labelled
tokens only (prompt and padding tokens are labelled -100 by the data module)::

    L = Σ_s weight_s · CE(stream s)

It is the refusal setting's teaching step (make an instruct model refuse harmful requests while it keeps
answering harmless ones: ``recipes/refusal/refusal_sft_smollm2.yaml``), the paper's post-TAR benign SFT
(``recipes/refusal/benign_sft.yaml``) and the demo's stage 0 (:mod:`tar_lightning.demo`: a fresh model learns the
invented knowledge world, forget and retain facts at weight 0.5 each, AdamW with :func:`warmup_cosine`).

:func:`warmup_cosine` is *not* the ``warmup_cosine`` of :mod:`tar_lightning.adversaries.optim`: its warmup starts
at ``1/W`` (step ``t`` gets ``(t + 1) / W``) where the Hugging Face schedule starts at 0 (``t / W``); after the
warmup both give the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Optional

from torch import Tensor

from tar_lightning.base_module import CausalLMModule, ModelArg, OptimizerFactory, SchedulerFactory, adamw
from tar_lightning.errors import ConfigError
from tar_lightning.losses import causal_lm_loss
from tar_lightning.schema import non_negative_number

__all__ = ["SFTModule", "check_stream_weights", "warmup_cosine"]


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """The LR multiplier of step ``t`` (a ``LambdaLR`` function): ``(t + 1) / warmup`` during the warmup, then a
    half cosine from 1 down to ``floor`` at ``steps`` (and ``floor`` after it).

    Args:
        steps: total optimizer steps.
        warmup: warmup steps (0: none).
        floor: the final multiplier.
    """

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def check_stream_weights(streams: Any, where: str = "SFTModule.streams") -> dict[str, float]:
    """``streams`` (stream name -> weight) as a plain dict of floats, in the given order.

    Raises:
        ConfigError: not a non-empty mapping, a name that is not a non-empty string, a weight that is not a finite
            number >= 0, or no weight > 0 (naming ``where`` and the bad key or value).
    """
    if not isinstance(streams, Mapping) or not streams:
        raise ConfigError(f"{where}={streams!r}: expected a non-empty mapping of stream name -> weight, "
                          "e.g. {retain: 1.0}")
    out: dict[str, float] = {}
    for name, weight in streams.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: stream name {name!r} is not a non-empty string")
        if isinstance(weight, bool):
            raise ConfigError(f"{where}[{name!r}] must be a finite number >= 0, got {weight!r}")
        out[name] = non_negative_number(weight, f"{where}[{name!r}]")
    if not any(w > 0 for w in out.values()):
        raise ConfigError(f"{where}={out!r}: every weight is 0, so nothing would be trained; give at least one "
                          "stream a weight > 0")
    return out


class SFTModule(CausalLMModule):
    """Supervised fine-tuning on one or more data streams (automatic optimization).

    Loss per step: ``Σ_s weight_s · CE(s)``, ``CE`` the mean next-token cross-entropy over the labelled tokens of
    one micro-batch of stream ``s`` (:func:`~tar_lightning.losses.causal_lm_loss`). A stream of weight 0 is
    switched off: it is not batched (the data module need not configure it) and costs no forward pass.

    Args:
        model: the model to fine-tune (source string, ``ModelSource`` or module).
        optimizer: optimizer factory; torch ``AdamW`` with lr 1e-5 and no weight decay by default (a plain,
            short fine-tuning run: no schedule-free warmup to outlast, nothing to decay towards).
        lr_scheduler: optional LR schedule factory.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
        streams: data stream name -> weight (default ``{"retain": 1.0}``: plain SFT on the retain stream).

    Raises:
        ConfigError: bad ``streams`` (see :func:`check_stream_weights`).
    """

    default_optimizer = staticmethod(adamw(lr=1e-5))

    def __init__(
        self,
        model: ModelArg,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        tokenizer: Any = None,
        streams: Optional[dict[str, float]] = None,
    ) -> None:
        weights = check_stream_weights({"retain": 1.0} if streams is None else streams)
        super().__init__(model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer)
        self.streams = weights
        self.save_init_hyperparameters(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer, streams=weights,
        )

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches per step for each data stream (read by the data module): one per stream, none for a
        stream of weight 0."""
        return {name: int(weight > 0) for name, weight in self.streams.items()}

    def sft_losses(self, batch: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss of one step's bundle (``{stream: {input_ids, attention_mask, labels}: [1, B, T]}``).

        Returns:
            ``(loss, ces)``: the 0-dim loss and the detached unweighted CE of every stream of weight > 0.
        """
        loss: Optional[Tensor] = None
        ces: dict[str, Tensor] = {}
        for name, weight in self.streams.items():
            if weight == 0:
                continue
            micro = self.first_micro_batch(batch, name)
            out = self.model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"], use_cache=False)
            ce = causal_lm_loss(out.logits, micro["labels"])
            ces[name] = ce.detach()
            loss = weight * ce if loss is None else loss + weight * ce
        assert loss is not None  # check_stream_weights keeps at least one weight > 0
        return loss, ces

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        loss, ces = self.sft_losses(batch)
        first = next(name for name, weight in self.streams.items() if weight > 0)
        size = batch[first]["input_ids"].shape[1]
        self.log_losses(loss, {f"ce_{name}": ce for name, ce in ces.items()}, batch_size=size)
        return loss
