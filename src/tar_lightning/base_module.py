"""What every training module of the library shares: the model and tokenizer, the outer optimizer (and the
train/eval modes of schedule-free optimizers), validation losses, and export metadata in checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from tar_lightning.errors import ConfigError
from tar_lightning.losses import causal_lm_loss, mean_entropy
from tar_lightning.models import ModelSource, load_model

__all__ = ["CausalLMModule", "ModelArg", "OptimizerFactory", "SchedulerFactory", "resolve_model"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
ModelArg = Union[str, ModelSource, nn.Module]


def resolve_model(model: ModelArg, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """A model argument (source string, :class:`ModelSource` or module) as ``(module, tokenizer)``."""
    if isinstance(model, (str, ModelSource)):
        loaded, tok = load_model(model)
        return loaded, tokenizer if tokenizer is not None else tok
    if isinstance(model, nn.Module):
        return model, tokenizer
    raise ConfigError(
        f"model: expected a model source (hub id, folder, .gguf, alias), a ModelSource or an nn.Module, "
        f"got {type(model).__name__}"
    )


def schedule_free_adamw(lr: float, warmup_steps: int) -> OptimizerFactory:
    """A factory of ``schedulefree.AdamWScheduleFree`` with the given LR and warmup."""

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=lr, warmup_steps=warmup_steps)

    return build


class CausalLMModule(L.LightningModule):
    """Base of the library's LightningModules around a causal LM.

    Args:
        model: a source string, a :class:`~tar_lightning.models.ModelSource`, or an ``nn.Module``.
        optimizer: builds the optimizer from the trainable parameters (``default_optimizer`` when ``None``).
        lr_scheduler: optional LR schedule factory, stepped once per optimizer step.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
    """

    #: used when no optimizer factory is given
    default_optimizer: OptimizerFactory = staticmethod(schedule_free_adamw(lr=2e-5, warmup_steps=32))

    def __init__(
        self,
        model: ModelArg,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = resolve_model(model, tokenizer)
        self.model.train()  # loaders return eval-mode models; Lightning keeps whatever mode it finds
        self.optimizer_factory = optimizer or self.default_optimizer
        self.scheduler_factory = lr_scheduler

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    # -- schedule-free optimizers keep separate training and evaluation points --------------------------------

    def _set_optimizer_mode(self, train: bool) -> None:
        if self._trainer is None:
            return
        for opt in self.trainer.optimizers:
            fn = getattr(opt, "train" if train else "eval", None)
            if callable(fn):
                fn()

    def on_train_start(self) -> None:
        self._set_optimizer_mode(train=True)

    def on_train_end(self) -> None:
        # Leave the weights at their evaluation point: what users save and attack after fit().
        self._set_optimizer_mode(train=False)

    def on_validation_start(self) -> None:
        self._set_optimizer_mode(train=False)

    def on_validation_end(self) -> None:
        # Validation inside fit() (trainer.training is False here): back to the training point before the next step.
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._set_optimizer_mode(train=True)

    # -- validation: held-out LM loss and predictive entropy per validation stream ----------------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        name = self._val_stream_name(dataloader_idx)
        size = batch["input_ids"].shape[0]
        self.log(f"val/{name}/loss", causal_lm_loss(out.logits, batch["labels"]), add_dataloader_idx=False,
                 batch_size=size)
        self.log(f"val/{name}/entropy", mean_entropy(out.logits, batch["attention_mask"]),
                 add_dataloader_idx=False, batch_size=size)

    def _val_stream_name(self, dataloader_idx: int) -> str:
        names = getattr(getattr(self.trainer, "datamodule", None), "val_stream_names", None)
        if names and dataloader_idx < len(names):
            return names[dataloader_idx]
        return f"dataloader{dataloader_idx}"

    def _fsdp2_mesh(self):
        """The data-parallel device mesh when the Trainer's strategy is ModelParallelStrategy (FSDP2), else None."""
        trainer = self._trainer
        if trainer is None:
            return None
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(trainer.strategy, ModelParallelStrategy):
            return None
        mesh = self.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
            raise ConfigError(f"tar_lightning shards with FSDP2 only; got a tensor-parallel mesh of size "
                              f"{mesh['tensor_parallel'].size()}: use tensor_parallel_size=1")
        return mesh["data_parallel"]

    # -- checkpoints ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `tar-lightning export` needs to rebuild an HF folder from the checkpoint alone.
        meta = {"hf_config": self.model.config.to_dict(), "model_prefix": "model."}
        if self.tokenizer is not None:
            if getattr(self, "_tokenizer_files", None) is None:
                from tar_lightning.export import tokenizer_files

                self._tokenizer_files = tokenizer_files(self.tokenizer)
            meta["tokenizer_files"] = self._tokenizer_files
        checkpoint["tar_lightning"] = meta
