"""What every training module of the library shares: the model and tokenizer, the outer optimizer (and the
train/eval modes of schedule-free optimizers), validation losses, and export metadata in checkpoints."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import schedulefree
import torch
import yaml
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from tar_lightning.checkpoint import is_sharded_checkpoint, load_checkpoint, read_checkpoint, tokenizer_files
from tar_lightning.errors import ConfigError
from tar_lightning.losses import causal_lm_loss, mean_entropy
from tar_lightning.models import ModelSource, load_model, model_from_checkpoint_metadata
from tar_lightning.sharding import fully_shard_model
from tar_lightning.snapshot import ParameterSnapshot

__all__ = [
    "CausalLMModule",
    "ModelArg",
    "OptimizerFactory",
    "SchedulerFactory",
    "adamw",
    "checkpoint_hyperparameters",
    "model_source_from_mapping",
    "plain_hyperparameter",
    "reshard_fsdp",
    "resolve_model",
    "schedule_free_adamw",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
ModelArg = Union[str, ModelSource, nn.Module]


def resolve_model(model: ModelArg, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """A model argument (source string, :class:`ModelSource` or a mapping of its fields, module) as
    ``(module, tokenizer)``."""
    if isinstance(model, Mapping):
        model = model_source_from_mapping(model)
    if isinstance(model, (str, os.PathLike, ModelSource)):
        loaded, tok = load_model(model)
        return loaded, tokenizer if tokenizer is not None else tok
    if isinstance(model, nn.Module):
        return model, tokenizer
    raise ConfigError(
        f"model: expected a model source (hub id, folder, .gguf, alias), a ModelSource (or a mapping of its fields) "
        f"or an nn.Module, got {type(model).__name__}"
    )


def model_source_from_mapping(value: Mapping[str, Any]) -> ModelSource:
    """A :class:`~tar_lightning.models.ModelSource` from a mapping of its fields (how a recipe or a checkpoint's
    hyperparameters write a model source).

    Raises:
        ConfigError: a key that is not a ``ModelSource`` field, or no ``source``.
    """
    names = [f.name for f in dataclasses.fields(ModelSource)]
    unknown = sorted(set(value) - set(names))
    if unknown or "source" not in value:
        problem = f"unknown keys {unknown}" if unknown else "no 'source'"
        raise ConfigError(f"model: a mapping of ModelSource fields with {problem}; expected 'source' and any of {names}")
    return ModelSource(**value)


def plain_hyperparameter(value: Any) -> Any:
    """``value`` as plain data a constructor accepts back (what a module records in its checkpoints).

    Numbers, strings, ``None`` and booleans stay; paths become strings; dataclasses (:class:`ModelSource`,
    ``TARConfig``, ``ShardingConfig``) become mappings of their fields; mappings and sequences are converted
    item by item. Anything else (an ``nn.Module``, an optimizer factory, a tokenizer) cannot be rebuilt from data
    and becomes ``None``.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_hyperparameter({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        return {str(k): plain_hyperparameter(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_hyperparameter(v) for v in value]
    return None


def _read_hparams_file(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A YAML file of constructor arguments (plain data only: ``yaml.safe_load``)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"hparams_file {os.fspath(path)!r}: cannot be read as YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"hparams_file {os.fspath(path)!r}: expected a mapping of constructor arguments, got "
                          f"{type(data).__name__}")
    return data


def checkpoint_hyperparameters(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The ``hyper_parameters`` a checkpoint (file or sharded folder) was saved with, without reading a sharded
    checkpoint's weights (they live in the shards; the hyperparameters in its ``meta.pt``)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    ckpt = load_checkpoint(path / "meta.pt" if is_sharded_checkpoint(path) else path)
    hparams = ckpt.get("hyper_parameters") or {}
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def adamw(lr: float, weight_decay: float = 0.0) -> OptimizerFactory:
    """A factory of ``torch.optim.AdamW`` with the given LR and weight decay (torch's other defaults)."""

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    return build


def schedule_free_adamw(lr: float, warmup_steps: int) -> OptimizerFactory:
    """A factory of ``schedulefree.AdamWScheduleFree`` with the given LR and warmup."""

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return schedulefree.AdamWScheduleFree(params, lr=lr, warmup_steps=warmup_steps)

    return build


def reshard_fsdp(module: nn.Module) -> int:
    """Reshards every FSDP2 module in ``module`` (freeing unsharded parameters; the sharded ones are registered
    again); returns how many were FSDP modules. A no-op without FSDP2.

    FSDP2 keeps a module unsharded after a forward that is not followed by a backward (a no-grad forward of the
    root, whose ``reshard_after_forward`` is off); its ``parameters()`` are then temporary full tensors.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
            n += 1
    return n


def _drop_empty_state(optimizer: torch.optim.Optimizer) -> None:
    """Remove the empty per-parameter entries that reading ``optimizer.state[p]`` (a defaultdict) leaves behind,
    as schedule-free ``train()``/``eval()`` do for parameters without state. An optimizer with such entries looks
    initialised to ``torch.distributed.checkpoint``, which then loads none of a checkpoint's optimizer state into
    it (silently)."""
    for p in [p for p, state in optimizer.state.items() if not state]:
        del optimizer.state[p]


class CausalLMModule(L.LightningModule):
    """Base of the library's LightningModules around a causal LM.

    Args:
        model: a source string, a :class:`~tar_lightning.models.ModelSource`, or an ``nn.Module``.
        optimizer: builds the optimizer from the trainable parameters (``default_optimizer`` when ``None``).
        lr_scheduler: optional LR schedule factory, stepped once per optimizer step (Lightning's ``interval:
            step``; its default, once per epoch, would never step a run that is one long epoch).
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

    @staticmethod
    def first_micro_batch(batch: dict[str, dict[str, Tensor]], stream: str) -> dict[str, Tensor]:
        """Micro-batch 0 of ``stream`` in a :class:`~tar_lightning.data.TARDataModule` step (``[n, b, L]`` tensors
        to ``[b, L]``), for modules that read one micro-batch per stream and step."""
        return {k: v[0] for k, v in batch[stream].items()}

    def log_losses(self, loss: Tensor, parts: dict[str, Tensor], batch_size: int) -> None:
        """Logs each part as ``train/<name>`` and the total as the progress bar's ``loss`` (not sent to the
        logger: the parts are)."""
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch_size, logger=False)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer)}
        if self.automatic_optimization:  # manual optimization (TAR) steps its scheduler itself
            scheduler["interval"] = "step"
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (the FSDP2 launch overlays): ``fully_shard`` every decoder layer and the
        root of the model (idempotent); under other strategies nothing. Modules with more models to shard (RMU's
        frozen copy, TAR's reference) extend or replace it."""
        mesh = self._fsdp2_mesh()
        if mesh is not None:
            fully_shard_model(self.model, mesh, trainer_precision=self.trainer.precision)

    # -- schedule-free optimizers keep separate training and evaluation points --------------------------------

    def _set_optimizer_mode(self, train: bool) -> None:
        if self._trainer is None:
            return
        for opt in self.trainer.optimizers:
            fn = getattr(opt, "train" if train else "eval", None)
            if callable(fn):
                fn()
                _drop_empty_state(opt)

    def _schedule_free_training_point(self) -> bool:
        """Whether the optimizers keep a training point apart from the evaluation point right now (schedule-free
        optimizers in train mode that have taken a step: their ``eval()`` moves the weights)."""
        if self._trainer is None or not self.trainer.optimizers:
            return False
        groups = [g for opt in self.trainer.optimizers for g in opt.param_groups]
        return (all("train_mode" in g for g in groups) and any(g["train_mode"] for g in groups)
                and any(opt.state for opt in self.trainer.optimizers))

    def on_fit_start(self) -> None:
        # Resuming under ModelParallelStrategy (FSDP2), torch.distributed.checkpoint first initialises the fresh
        # optimizer's state with a zero-LR step, which a schedule-free optimizer refuses in eval mode (its initial
        # mode). A fresh optimizer holds no state yet: switching it to train mode leaves the weights unchanged.
        self._set_optimizer_mode(train=True)

    def on_train_start(self) -> None:
        self._set_optimizer_mode(train=True)

    def on_train_end(self) -> None:
        # Leave the weights at their evaluation point: what users save and attack after fit().
        self._set_optimizer_mode(train=False)

    def on_validation_start(self) -> None:
        reshard_fsdp(self)  # a stale unsharded copy must not hide the evaluation point set next
        # Validation inside fit() with a schedule-free optimizer: eval() moves the weights to x and train() back to
        # y, a round trip that is not exact in floating point (a few elements change by an ulp), so a validation
        # pass would perturb training and a run resumed from a checkpoint taken before a validation would drift
        # from the uninterrupted one. The training point is kept instead (one copy of the trainable weights, on
        # ``config.snapshot_device`` when the module has one, for the length of the validation) and restored.
        self._training_point = None
        if self.trainer.state.fn == TrainerFn.FITTING and self._schedule_free_training_point():
            device = getattr(getattr(self, "config", None), "snapshot_device", None)
            self._training_point = ParameterSnapshot(self.trainable_parameters(), device=device)
        self._set_optimizer_mode(train=False)

    def on_validation_end(self) -> None:
        # After the callbacks' validation hooks (MCQValidation scores in on_validation_epoch_end): no-grad forwards
        # leave FSDP2's root group unsharded, and its temporary full tensors would be what the next training step
        # takes for the parameters (and would hide the optimizer's switch back to the training point).
        reshard_fsdp(self)
        # Validation inside fit() (trainer.training is False here): back to the training point before the next step.
        if self.trainer.state.fn == TrainerFn.FITTING:
            point, self._training_point = getattr(self, "_training_point", None), None
            if point is None:
                self._set_optimizer_mode(train=True)
            else:  # back to the training point bit for bit; the optimizers' mode flag follows
                point.restore()
                for opt in self.trainer.optimizers:
                    for group in opt.param_groups:
                        group["train_mode"] = True

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
                self._tokenizer_files = tokenizer_files(self.tokenizer)
            meta["tokenizer_files"] = self._tokenizer_files
        checkpoint["tar_lightning"] = meta

    def save_init_hyperparameters(self, **init_args: Any) -> None:
        """Record the constructor's arguments in checkpoints, so that ``load_from_checkpoint`` and
        ``tar-lightning fit|validate --ckpt_path PATH`` rebuild this module.

        Built by ``tar-lightning`` (LightningCLI): the CLI's own configuration of the module (class path and
        arguments as plain data, optimizer factories included), which Lightning re-instantiates. Otherwise
        ``init_args`` as plain data (:func:`plain_hyperparameter`): an argument given as a Python object that data
        cannot describe (a module, an optimizer factory) is recorded as ``None``; pass it again to
        ``load_from_checkpoint`` (the model is rebuilt from the checkpoint itself when it is not given).
        """
        # Lightning's record of the arguments LightningCLI instantiates a module with (plain data, restorable by
        # its trusted instantiator); None when the module is built in Python.
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()
        else:
            self.save_hyperparameters({k: plain_hyperparameter(v) for k, v in init_args.items()})

    @classmethod
    def _restore_kwargs(cls, ckpt: dict[str, Any], path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments ``load_from_checkpoint`` adds to the recorded ones: the model rebuilt from
        the checkpoint's own metadata (architecture and tokenizer) when it was given as a module."""
        hparams = ckpt.get("hyper_parameters") or {}
        if "_instantiator" in hparams or kwargs.get("model") is not None or hparams.get("model") is not None:
            return kwargs
        model, tokenizer = model_from_checkpoint_metadata(ckpt.get("tar_lightning"), path)
        extra = {"model": model}
        if kwargs.get("tokenizer") is None:
            extra["tokenizer"] = tokenizer
        return {**kwargs, **extra}

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Union[str, os.PathLike],
        map_location: Any = None,
        hparams_file: Optional[Union[str, os.PathLike]] = None,
        strict: Optional[bool] = None,
        **kwargs: Any,
    ):
        """This module with the weights of a checkpoint: a ``.ckpt`` file, or a sharded FSDP2 checkpoint folder
        (consolidated in this one process). Nothing in the file is unpickled but tensors and plain data.

        Args:
            checkpoint_path: the file or folder.
            map_location: where to put the module afterwards (a device or its name; default: the CPU).
            hparams_file: a YAML file of constructor arguments to use instead of the recorded ones.
            strict: as ``torch.nn.Module.load_state_dict``.
            **kwargs: constructor arguments overriding the recorded ones (e.g. ``model=`` a module, an optimizer).

        Raises:
            ConfigError / ModelLoadError: a missing, unreadable, unsafe or foreign checkpoint.
        """
        path = os.fspath(checkpoint_path)
        ckpt = read_checkpoint(path)
        if hparams_file is not None:
            ckpt[cls.CHECKPOINT_HYPER_PARAMS_KEY] = _read_hparams_file(hparams_file)
        kwargs = cls._restore_kwargs(ckpt, path, kwargs)
        ckpt.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
        ckpt[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
        # Lightning's own restoration: recorded arguments (a LightningCLI record only through its allow-listed
        # instantiator), configure_model, on_load_checkpoint, load_state_dict.
        module = _load_state(cls, ckpt, strict=strict, **kwargs)
        return module.to(map_location) if map_location is not None else module
