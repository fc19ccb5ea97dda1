"""Stage 1 of TAR for weaponization knowledge: the random-mapping safeguard.

Every hidden state (embedding output and each layer) of forget-domain text is pushed towards a fixed random
direction of its token (1 − |cos| to a row of a random table), while next-token CE on retain text keeps
capability. Its output is TAR's starting checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from tar_lightning.base_module import (
    CausalLMModule,
    ModelArg,
    OptimizerFactory,
    SchedulerFactory,
    schedule_free_adamw,
)
from tar_lightning.errors import ConfigError
from tar_lightning.losses import causal_lm_loss, random_mapping_loss, random_mapping_table

__all__ = ["RandomMappingModule"]


class RandomMappingModule(CausalLMModule):
    """Random-mapping safeguard training (TAR stage 1), with automatic optimization.

    Loss per step: ``retain_weight · CE(retain) + forget_weight · L_rm(forget)``.

    Args:
        model: the model to safeguard (source string, ``ModelSource`` or module).
        optimizer: optimizer factory; schedule-free AdamW, lr 1e-5, 100 warmup (the paper's setting) by default.
        lr_scheduler: optional LR schedule factory.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
        forget_stream: name of the forget-domain stream.
        retain_stream: name of the retain stream.
        forget_weight: weight of the random-mapping term.
        retain_weight: weight of the retain CE.
        table_seed: seed of the random table (fixed, never trained; identical on every rank and machine).

    Raises:
        ConfigError: negative weights.
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
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        table_seed: int = 42,
    ) -> None:
        for key, value in (("forget_weight", forget_weight), ("retain_weight", retain_weight)):
            if not value >= 0:
                raise ConfigError(f"RandomMappingModule.{key}={value!r}: expected a number >= 0")
        super().__init__(model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer)
        self.forget_stream = forget_stream
        self.retain_stream = retain_stream
        self.forget_weight = forget_weight
        self.retain_weight = retain_weight
        self.table_seed = table_seed
        self.save_init_hyperparameters(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer,
            forget_stream=forget_stream, retain_stream=retain_stream, forget_weight=forget_weight,
            retain_weight=retain_weight, table_seed=table_seed,
        )
        emb = self.model.get_input_embeddings().weight
        # In the model's dtype: for large vocabularies the table is as big as the embedding matrix.
        table = random_mapping_table(emb.shape[0], emb.shape[1], seed=table_seed, dtype=emb.dtype)
        self.register_buffer("table", table, persistent=False)

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches per step for each data stream (read by the data module)."""
        return {self.retain_stream: 1, self.forget_stream: 1}

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        retain = self.first_micro_batch(batch, self.retain_stream)
        forget = self.first_micro_batch(batch, self.forget_stream)
        out_r = self.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], use_cache=False)
        ce = causal_lm_loss(out_r.logits, retain["labels"])
        out_f = self.model(
            input_ids=forget["input_ids"],
            attention_mask=forget["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
        rm = random_mapping_loss(out_f.hidden_states, forget["input_ids"], self.table, forget["attention_mask"])
        loss = self.retain_weight * ce + self.forget_weight * rm
        self.log_losses(loss, {"retain_ce": ce, "random_mapping": rm}, batch_size=retain["input_ids"].shape[0])
        return loss

