"""Plain language-model fine-tuning on named streams: :class:`KnowledgeLMModule`.

The demo's stage 0 (:mod:`tar_lightning.demo`) teaches a fresh model the invented knowledge world with it
(forget-domain and retain-domain facts at once) before any safeguard is trained. It owns its learning-rate
schedule, :func:`warmup_cosine`, which is *not* the ``warmup_cosine`` of
:mod:`tar_lightning.adversaries.optim`: the warmup here starts at ``1/W`` (step ``t`` gets ``(t + 1) / W``)
where the Hugging Face schedule starts at 0 (``t / W``); after the warmup both give the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tar_lightning.base_module import CausalLMModule
from tar_lightning.losses import causal_lm_loss

__all__ = ["KnowledgeLMModule", "warmup_cosine"]


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


class KnowledgeLMModule(CausalLMModule):
    """Plain next-token CE on a forget and a retain stream (the mean of the two CEs per step).

    Args:
        model, tokenizer: the model to teach.
        lr, steps, warmup_steps, weight_decay: AdamW with linear warmup and cosine decay to 10% over ``steps``
            (:func:`warmup_cosine`).
        streams: the stream names (default ``("forget", "retain")``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        lr: float = 3e-3,
        steps: int = 1000,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        streams: Sequence[str] = ("forget", "retain"),
    ) -> None:
        super().__init__(model, tokenizer=tokenizer)
        self.lr, self.steps, self.warmup_steps, self.weight_decay = lr, steps, warmup_steps, weight_decay
        self.streams = tuple(streams)
        self.save_init_hyperparameters(model=model, tokenizer=tokenizer, lr=lr, steps=steps,
                                       warmup_steps=warmup_steps, weight_decay=weight_decay, streams=self.streams)

    def stream_steps(self) -> dict[str, int]:
        return {s: 1 for s in self.streams}

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.steps, self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        losses = []
        for s in self.streams:
            mb = {k: v[0] for k, v in batch[s].items()}
            out = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
            losses.append(causal_lm_loss(out.logits, mb["labels"]))
        loss = torch.stack(losses).mean()
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=1)
        return loss
