"""RMU (Representation Misdirection for Unlearning, Li et al. 2024, the WMDP paper): the stage-1 baseline.

At one decoder layer ℓ, the activations of forget-domain text are steered to a fixed random direction scaled by
the steering coefficient ``c``, while the activations of retain text are held at those of a frozen copy of the
starting model::

    L = L_forget + α · L_retain
    L_forget = mean over forget tokens of  ||h_ℓ(x_forget) − c·u||² / H
    L_retain = mean over retain tokens of  ||h_ℓ(x_retain) − h_ℓ^frozen(x_retain)||² / H

``h_ℓ`` is the output of decoder layer ``ℓ`` (0-based; the hidden state Hugging Face returns at index ``ℓ + 1``
with ``output_hidden_states=True``), ``H`` the hidden size (the per-element mean of the WMDP code's
``mse_loss``, so its published ``c`` and ``α`` apply unchanged), and ``u`` a unit vector whose entries are drawn
uniformly from ``[0, 1)`` with a fixed seed (as in the WMDP code), then normalised. Unlike the WMDP code,
padding positions are left out of both means. Only the parameters of one submodule (``mlp`` by default) of the
decoder layers ``update_layers`` (``ℓ−2..ℓ`` by default) are trained; everything else is frozen.

Paper setting (Zephyr-7B, WMDP-Bio/Cyber): ℓ = 7, update layers 5, 6, 7, c = 6.5, α = 1200, AdamW lr 5e-5.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from tar_lightning.base_module import CausalLMModule, ModelArg, OptimizerFactory, SchedulerFactory, adamw
from tar_lightning.common import is_int
from tar_lightning.errors import ConfigError
from tar_lightning.models import decoder_layers, frozen_copy
from tar_lightning.sharding import fully_shard_model

__all__ = ["RMUModule", "layer_output", "rmu_direction", "rmu_layers", "steering_distance"]


def rmu_layers(layer: Any, update_layers: Any, num_layers: Optional[int], where: str = "RMUModule") -> list[int]:
    """The decoder layers RMU trains: ``update_layers`` checked against the steered ``layer`` (each distinct, in
    ``0..layer``: a later layer cannot change ``h_layer``), or ``layer-2..layer`` (those >= 0) when it is ``None``.
    ``layer`` is checked against ``num_layers`` when that is known (``None``: the caller does not know the model
    yet). The one check of these arguments, for :class:`RMUModule` and the demo's ``rmu`` section; errors name
    ``<where>.layer`` / ``<where>.update_layers``.

    Raises:
        ConfigError: a layer outside the model, or bad ``update_layers``.
    """
    if not is_int(layer) or layer < 0 or (num_layers is not None and layer >= num_layers):
        span = f"0..{num_layers - 1} (the model has {num_layers} decoder layers)" if num_layers is not None else ">= 0"
        raise ConfigError(f"{where}.layer={layer!r}: expected a decoder layer index in {span}")
    if update_layers is None:
        return [i for i in range(layer - 2, layer + 1) if i >= 0]
    chosen = list(update_layers) if isinstance(update_layers, (list, tuple)) else None
    if not chosen or any(not is_int(i) for i in chosen) or len(set(chosen)) != len(chosen):
        raise ConfigError(f"{where}.update_layers={update_layers!r}: expected a non-empty list of distinct "
                          f"decoder layer indices in 0..{layer} (the steered layer)")
    bad = [i for i in chosen if not 0 <= i <= layer]
    if bad:
        raise ConfigError(f"{where}.update_layers={update_layers!r}: {bad} outside 0..{layer}; layers after "
                          f"the steered layer {layer} cannot change its output")
    return [int(i) for i in chosen]


def rmu_direction(hidden_size: int, seed: int) -> Tensor:
    """RMU's fixed random unit vector ``u`` (fp32, CPU): entries uniform in ``[0, 1)`` from a generator seeded with
    ``seed`` (drawn in fp64, identical on every machine), divided by their L2 norm."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).float()


def steering_distance(hidden: Tensor, target: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over (non-padding) tokens of ``||hidden − target||² / H``, in fp32.

    Args:
        hidden: ``[B, T, H]`` activations.
        target: ``[B, T, H]`` or anything broadcasting to it (``[H]``: the steering vector); treated as given
            (detach it if it must not receive gradients).
        attention_mask: ``[B, T]`` of 0/1; ``None`` counts every position.

    Returns:
        A 0-dim fp32 tensor (0 when the mask holds no token).
    """
    per_token = (hidden.float() - target.to(device=hidden.device, dtype=torch.float32)).square().mean(dim=-1)
    if attention_mask is None:
        return per_token.mean()
    mask = (attention_mask.to(per_token.device) != 0).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


@contextlib.contextmanager
def _capture(layer: nn.Module) -> Iterator[list[Tensor]]:
    """The outputs of ``layer`` during the block (a forward hook, removed afterwards)."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        seen.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = layer.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def layer_output(model: nn.Module, layer: int, batch: dict[str, Tensor]) -> Tensor:
    """The output ``[B, T, H]`` of decoder layer ``layer`` of ``model`` on ``batch`` (``input_ids``,
    ``attention_mask``), taken by a forward hook on the layer (the whole model runs, so FSDP2's hooks see a
    normal forward).

    Raises:
        ConfigError: ``layer`` did not run exactly once.
    """
    with _capture(decoder_layers(model)[layer]) as seen:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if len(seen) != 1:
        raise ConfigError(f"RMU: decoder layer {layer} ran {len(seen)} times in one forward; expected once")
    return seen[0]


class RMUModule(CausalLMModule):
    """RMU unlearning (the WMDP paper's baseline; a stage-1 safeguard like :class:`RandomMappingModule`), with
    automatic optimization. See the module docstring for the loss.

    Args:
        model: the model to safeguard (source string, ``ModelSource`` or module).
        optimizer: optimizer factory (given only the trained parameters); AdamW, lr 5e-5 (the paper's) by default.
        lr_scheduler: optional LR schedule factory.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
        forget_stream: name of the forget-domain stream.
        retain_stream: name of the retain stream.
        layer: the decoder layer ℓ (0-based) whose output is steered and retained.
        steering_coeff: ``c``, the norm of the steering target ``c·u``; > 0.
        alpha: ``α``, weight of the retain term; >= 0 (0 skips the retain pass and the frozen copy).
        update_layers: the decoder layers whose ``update_module`` trains; ``None``: ``ℓ−2, ℓ−1, ℓ`` (those >= 0).
            Each must be <= ℓ (a later layer cannot change ``h_ℓ``).
        update_module: the submodule of each decoder layer whose parameters train (``mlp``: every MLP weight;
            ``mlp.down_proj``: the WMDP code's single matrix).
        seed: seed of ``u`` (fixed, never trained; identical on every rank and machine).

    Raises:
        ConfigError: a layer outside the model (naming its layer count), a non-positive ``steering_coeff``, a
            negative ``alpha``, bad ``update_layers``, or an ``update_module`` the layers do not have.

    The frozen copy is taken by :meth:`configure_model` (Lightning calls it when fit starts; call it yourself to
    use :meth:`rmu_losses` outside a Trainer), before a checkpoint is restored, so on resume it holds the weights
    the model source gives. A module built from an in-memory model and reloaded with ``load_from_checkpoint`` is
    rebuilt from the trained weights: pass ``model=`` (the starting model) to train it further.
    """

    default_optimizer = staticmethod(adamw(lr=5e-5))

    def __init__(
        self,
        model: ModelArg,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        tokenizer: Any = None,
        forget_stream: str = "forget",
        retain_stream: str = "retain",
        layer: int = 7,
        steering_coeff: float = 6.5,
        alpha: float = 1200.0,
        update_layers: Optional[Sequence[int]] = None,
        update_module: str = "mlp",
        seed: int = 42,
    ) -> None:
        for key, value, low in (("steering_coeff", steering_coeff, "> 0"), ("alpha", alpha, ">= 0")):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not (value > 0 if low == "> 0" else value >= 0):
                raise ConfigError(f"RMUModule.{key}={value!r}: expected a finite number {low}")
        if not is_int(seed):
            raise ConfigError(f"RMUModule.seed={seed!r}: expected an integer")
        super().__init__(model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer)
        layers = decoder_layers(self.model)
        chosen = rmu_layers(layer, update_layers, len(layers), where="RMUModule")
        self.model.requires_grad_(False)
        for i in chosen:
            try:
                sub = layers[i].get_submodule(update_module) if isinstance(update_module, str) else None
            except AttributeError:
                sub = None
            params = list(sub.parameters()) if sub is not None else []
            if not params:
                names = sorted({name.split(".")[0] for name, _ in layers[i].named_modules() if name})
                raise ConfigError(f"RMUModule.update_module={update_module!r}: decoder layer {i} "
                                  f"({type(layers[i]).__name__}) has no such submodule with parameters; it has "
                                  f"{names}")
            for p in params:
                p.requires_grad_(True)
        self.forget_stream = forget_stream
        self.retain_stream = retain_stream
        self.layer = int(layer)
        self.steering_coeff = float(steering_coeff)
        self.alpha = float(alpha)
        self.update_layers = [int(i) for i in chosen]
        self.update_module = update_module
        self.seed = int(seed)
        self.save_init_hyperparameters(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer,
            forget_stream=forget_stream, retain_stream=retain_stream, layer=layer, steering_coeff=steering_coeff,
            alpha=alpha, update_layers=update_layers, update_module=update_module, seed=seed,
        )
        hidden = self.model.get_input_embeddings().weight.shape[1]
        self.register_buffer("direction", rmu_direction(hidden, self.seed), persistent=False)
        # Not a registered submodule: frozen, never trained, never checkpointed (built by configure_model).
        object.__setattr__(self, "frozen_model", None)

    def configure_model(self) -> None:
        """Takes the frozen copy of the starting model (once; not with ``alpha == 0``). Under
        ``ModelParallelStrategy`` (the FSDP2 launch overlays): then ``fully_shard`` on every decoder layer and the
        root of the model and of the frozen copy (idempotent); under other strategies nothing more."""
        if self.frozen_model is None and self.alpha > 0:
            object.__setattr__(self, "frozen_model", frozen_copy(self.model))
        super().configure_model()
        mesh = self._fsdp2_mesh()
        if mesh is not None and self.frozen_model is not None:
            fully_shard_model(self.frozen_model, mesh, trainer_precision=self.trainer.precision, inference_only=True)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.frozen_model is not None and self._fsdp2_mesh() is None:
            # Single device / DDP: next to the model, in its dtype (Lightning's precision conversion is done now).
            weight = next(self.model.parameters())
            self.frozen_model.to(device=weight.device, dtype=weight.dtype)

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches per step for each data stream (read by the data module)."""
        return {self.retain_stream: 1, self.forget_stream: 1}

    def rmu_losses(self, forget: dict[str, Tensor], retain: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The RMU loss of one forget and one retain batch (``input_ids``, ``attention_mask``: ``[B, T]``).

        Returns:
            ``(loss, parts)``: the 0-dim fp32 loss and the detached unweighted terms ``"forget"`` and ``"retain"``.

        Raises:
            ConfigError: ``alpha > 0`` and :meth:`configure_model` has not run (no frozen copy).
        """
        h_forget = layer_output(self.model, self.layer, forget)
        forget_loss = steering_distance(h_forget, self.steering_coeff * self.direction, forget["attention_mask"])
        loss, parts = forget_loss, {"forget": forget_loss.detach()}
        if self.alpha > 0:
            if self.frozen_model is None:
                raise ConfigError("RMUModule: alpha > 0 needs the frozen copy of the model, which configure_model() "
                                  "takes (Lightning calls it when fit starts); call module.configure_model() first")
            h_retain = layer_output(self.model, self.layer, retain)
            with torch.no_grad():
                h_frozen = layer_output(self.frozen_model, self.layer, retain)
            retain_loss = steering_distance(h_retain, h_frozen, retain["attention_mask"])
            loss = loss + self.alpha * retain_loss
            parts["retain"] = retain_loss.detach()
        return loss, parts

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        forget = self.first_micro_batch(batch, self.forget_stream)
        loss, parts = self.rmu_losses(forget, self.first_micro_batch(batch, self.retain_stream))
        self.log_losses(loss, {f"rmu_{k}": v for k, v in parts.items()}, batch_size=forget["input_ids"].shape[0])
        return loss
