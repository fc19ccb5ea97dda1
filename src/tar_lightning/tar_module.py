"""``TARModule``: TAR's adversarial meta-training as a LightningModule with manual optimization.

One training batch is one outer step (TAR's stage 2)::

    snapshot θ
    for each trajectory:            sample an adversary, its LR and switch point (same on every rank)
        for k in 0..K-1:            adversary update on its stream (fresh optimizer, never seen by Lightning)
            every tr_every steps:   ∇ λ_TR·w_k/T·L_TR(θ'_k) accumulated into the TR buffer (first order)
        restore θ (bit-exact)
    ∇ λ_retain·L_retain(θ) added to the buffer; clip; one outer optimizer step (= one global_step)

:meth:`TARModule.training_step` is these three phases, each a method. What is not the algorithm lives beside it:
the averaging of gradients over data-parallel ranks, chosen once per fit (:mod:`tar_lightning.grad_sync`), the
NaN/Inf check of every outer step (:class:`tar_lightning.guards.NonFiniteGuard`) and the persistent adversaries
(:class:`tar_lightning.persistent.AdversaryPool`).

Options beyond the paper, all off by default (``TARConfig``; docs/TAR_OPTIONS.md): ``persistent_state: full``
(a continued pooled trajectory is one longer attack: optimizer state, schedule position and TR weights by global
step), ``fork_every`` (MUDMAN's forked persistent adversary), and MUDMAN's ``disruption_mask`` and
``normalize_tr_grad``, applied to the TR gradient between phase 2's retain backward and phase 3
(:meth:`TARModule._add_tr_gradient`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from tar_lightning.adversaries.config import check_lora_targets, sample_adversary
from tar_lightning.adversaries.runner import AdversaryRun
from tar_lightning.base_module import (
    CausalLMModule,
    ModelArg,
    OptimizerFactory,
    SchedulerFactory,
    model_source_from_mapping,
    resolve_model,
)
from tar_lightning.checkpoint import check_finite
from tar_lightning.errors import ConfigError
from tar_lightning.grad_sync import GradientSync, choose_gradient_sync
from tar_lightning.guards import NonFiniteGuard
from tar_lightning.losses import (
    CandidateTokens,
    max_entropy_loss,
    negative_ce_loss,
    retain_loss,
)
from tar_lightning.losses.dpo import dpo_loss, sequence_logprobs
from tar_lightning.models import ModelSource, freeze, frozen_copy, load_model, meta_copy
from tar_lightning.persistent import AdversaryPool, load_optimizer_state, optimizer_state
from tar_lightning.sharding import ShardingConfig, apply_activation_checkpointing, fully_shard_model
from tar_lightning.snapshot import GradientBuffer, ParameterSnapshot, local_tensor
from tar_lightning.strategy import (
    RANK_LOCAL_KEY,
    FSDP2Strategy,
    check_strategy,
    data_parallel_world_size,
    has_sharded_parameters,
)
from tar_lightning.tar_config import TARConfig

__all__ = ["TARModule", "micro_batch", "step_generator"]

# Lightning warns that checkpoints of manually optimized modules hold the weights after the optimizer step.
# For TAR that is exactly right: at batch end the attacked weights are restored and the outer step is done.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def micro_batch(stream: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Micro-batch ``index`` of a stream bundle ``{key: [n, b, L]}``."""
    return {key: value[index] for key, value in stream.items()}


def step_generator(seed: int, step: int, trajectory: int) -> torch.Generator:
    """The generator of every random choice of one trajectory: a pure function of its arguments, so all ranks
    draw the same adversary/LR/switch point without communicating, and a resumed run draws what the
    uninterrupted one did."""
    state = np.random.SeedSequence([seed, step, trajectory]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class _Trajectory:
    """The random choices of one trajectory (:meth:`TARModule._draw_trajectory`)."""

    index: int  # the adversary, in config.adversaries
    lr: float
    switch: Optional[int]  # the retain→forget switch point
    init_seed: int  # of LoRA adapters
    resume_from: Optional[int] = None  # the persistent-pool entry it continues
    slot: int = 0  # the pool entry a fresh trajectory replaces once the pool is full
    start: int = 0  # adversary steps the continued entry ran before (its global step offset)


@dataclass
class _Attacks:
    """What the attack phase of an outer step leaves: the TR gradient and the diagnostics to log."""

    tr_grads: GradientBuffer
    adv_losses: Tensor  # [K]: adversary loss per step, mean over trajectories
    tr_losses: Tensor  # [E]: TR loss per evaluation point, mean over trajectories
    tr_diag: Tensor  # [E]: its diagnostic (entropy, CE or DPO reward accuracy)
    adv_lrs: list[float] = field(default_factory=list)
    continued: int = 0  # trajectories that continued a persistent-pool entry


class TARModule(CausalLMModule):
    """Tamper-resistant training (TAR stage 2) of a causal LM.

    Args:
        model: the model to make tamper-resistant (usually a stage-1 safeguarded checkpoint): a source string
            (hub id, local HF folder, ``.gguf`` file, ``smollm2-135m-instruct``, ``tiny``), a
            :class:`~tar_lightning.models.ModelSource`, or an ``nn.Module``.
        config: TAR hyperparameters (a :class:`TARConfig` or a mapping of its fields).
        optimizer: builds the outer optimizer from the parameters; schedule-free AdamW (lr 2e-5, 32 warmup)
            by default. Its ``train()``/``eval()`` modes, when it has them, are handled here.
        lr_scheduler: optional outer LR schedule, stepped once per outer step.
        reference_model: the frozen model of the representation retain term: ``None`` (a frozen copy of
            ``model`` as given, when ``config.retain_representation``), a source, or a module. Built when the
            module is first configured (:meth:`_setup_reference`); under FSDP2 only as shards in the compute dtype.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
        sharding: FSDP2 mixed precision and activation checkpointing (:class:`~tar_lightning.sharding.ShardingConfig`
            or a mapping of its fields; default: bf16 params / fp32 reduce under ``bf16-mixed``, no checkpointing).

    Batches are dicts of named streams, each ``{input_ids, attention_mask, labels}`` of shape ``[n, b, L]``
    where n is what :meth:`stream_steps` asks for (:class:`~tar_lightning.data.TARDataModule` builds them).

    Raises:
        ConfigError: invalid config; ``Trainer(gradient_clip_val=...)``, ``accumulate_grad_batches > 1`` or
            fp16 mixed precision (use ``config.clip_grad_norm``; accumulation is not supported; use bf16);
            a batch lacking a stream the config needs; a ``ModelParallelStrategy`` with tensor parallelism;
            ``persistent_pool`` on several FSDP2 ranks with checkpoints under a strategy that cannot store each
            rank's deltas (use :class:`tar_lightning.strategy.FSDP2Strategy`).

    Under ``ModelParallelStrategy`` (FSDP2), :meth:`configure_model` applies ``fully_shard`` to every decoder
    layer and the root, the reference model is built as shards the same way (:meth:`_setup_reference`), FSDP averages the
    gradients itself, and the clip norm is the global one over all shards. LoRA adversaries inject their adapters
    into the sharded model as plain (replicated) tensors, initialised alike on every rank, whose gradients are
    averaged over the ranks before each adversary step; the persistent pool keeps each rank's shards of the deltas
    (checkpointed per rank under ``checkpoint["tar_rank_local"]``). Validation reshards the model afterwards, and
    every outer step checks that the trainable parameters are sharded ``DTensor`` s.
    """

    def __init__(
        self,
        model: ModelArg,
        config: Optional[TARConfig] = None,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[SchedulerFactory] = None,
        reference_model: Union[None, str, ModelSource, nn.Module] = None,
        tokenizer: Any = None,
        sharding: Optional[ShardingConfig] = None,
    ) -> None:
        if isinstance(config, Mapping):  # the plain form checkpoints record
            config = TARConfig.from_dict(config, "TARModule.config")
        cfg = (config if config is not None else TARConfig()).validate()
        shard_cfg = ShardingConfig.from_value(sharding)
        super().__init__(model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer)
        self.automatic_optimization = False
        self.config = cfg
        self.sharding = shard_cfg
        # The reference model is built once the strategy is known (_setup_reference, from configure_model, before
        # any checkpoint is restored into the policy). Until then: what it is made from. Neither is a registered
        # submodule: the reference is frozen, never trained, never checkpointed, and stays in eval mode whatever
        # mode Lightning puts the module in.
        object.__setattr__(self, "reference_model", None)
        object.__setattr__(self, "_reference_source", reference_model)
        # A copy of the policy as given needs its structure only (meta device, no memory): under FSDP2 its values
        # come from the policy's shards; otherwise it is a deep copy taken at configure_model.
        skeleton = meta_copy(self.model) if cfg.retain_representation and reference_model is None else None
        object.__setattr__(self, "_reference_skeleton", skeleton)
        self.save_init_hyperparameters(
            model=model, config=cfg, optimizer=optimizer, lr_scheduler=lr_scheduler,
            reference_model=reference_model, tokenizer=tokenizer, sharding=shard_cfg,
        )
        self._tr_weights = self.config.tr_weights()
        self._tr_points = set(self.config.tr_points())
        # Checked once and its index tensor kept per device: no host-to-device copy (a CUDA sync) per TR loss.
        self._entropy_tokens = (None if cfg.entropy_tokens is None
                                else CandidateTokens(cfg.entropy_tokens, "TARConfig.entropy_tokens"))
        if cfg.fork_every:  # MUDMAN's forked adversary: one absolute entry, retired after fork_every outer steps
            self.adversary_pool = AdversaryPool(1, cfg.attack_horizon(), cfg.snapshot_device, relative=False)
        elif cfg.persistent_pool:
            self.adversary_pool = AdversaryPool(cfg.persistent_pool, cfg.persistent_horizon, cfg.snapshot_device)
        else:
            self.adversary_pool = None
        self.nonfinite_guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)  # its counters are checkpointed
        self._grad_sync: Optional[GradientSync] = None  # chosen by configure_model (none / DDP / FSDP2)

    @property
    def _nonfinite_in_a_row(self) -> int:
        """Skipped non-finite outer steps in a row (see :class:`~tar_lightning.guards.NonFiniteGuard`)."""
        return self.nonfinite_guard.in_a_row

    @property
    def _nonfinite_total(self) -> int:
        """Skipped non-finite outer steps in total."""
        return self.nonfinite_guard.total

    # -- Lightning plumbing ---------------------------------------------------------------------------------


    def _fully_shard(self, model: nn.Module, mesh, *, activation_checkpointing: Optional[bool] = None,
                     inference_only: bool = False) -> None:
        """FSDP2 with this module's :class:`ShardingConfig` (see :func:`tar_lightning.sharding.fully_shard_model`)."""
        precision = getattr(self._trainer, "precision", None) if self._trainer is not None else None
        fully_shard_model(model, mesh, self.sharding, precision, activation_checkpointing=activation_checkpointing,
                          inference_only=inference_only)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shards the policy with FSDP2 (idempotent). Under every strategy:
        activation checkpointing of the decoder layers when ``sharding.activation_checkpointing``.

        Then builds the frozen reference model (:meth:`_setup_reference`), and chooses the gradient
        synchronisation of the outer step (:func:`~tar_lightning.grad_sync.choose_gradient_sync`).
        """
        mesh = self._fsdp2_mesh()
        if mesh is None:
            if self.sharding.activation_checkpointing:
                apply_activation_checkpointing(self.model)
        else:
            if self.adversary_pool is not None and self._trainer.checkpoint_callbacks:
                self._check_pool_checkpointing()
            self._fully_shard(self.model, mesh)
        self._setup_reference(mesh)  # the frozen reference model, sharded like the policy under FSDP2
        self._grad_sync = choose_gradient_sync(self.trainable_parameters())

    def _check_pool_checkpointing(self) -> None:
        """Under FSDP2 with several ranks, the persistent pool's deltas are rank-local shards: a checkpoint must
        store each rank's part, which only :class:`tar_lightning.strategy.FSDP2Strategy` does (Lightning's
        ``ModelParallelStrategy`` writes everything but the DCP shards from rank 0 alone).

        Raises:
            ConfigError: when a checkpoint would silently lose the other ranks' deltas.
        """
        if data_parallel_world_size() <= 1 or isinstance(self._trainer.strategy, FSDP2Strategy):
            return
        key = "fork_every" if self.config.fork_every else "persistent_pool"
        raise ConfigError(
            f"TARConfig.{key}={getattr(self.config, key)} under {type(self._trainer.strategy).__name__} "
            f"with {data_parallel_world_size()} ranks: the stored adversary deltas are sharded like the weights and "
            "this strategy saves non-weight checkpoint entries from rank 0 only, so a checkpoint would lose the other "
            "ranks' shards. Use strategy tar_lightning.strategy.FSDP2Strategy (what the recipes/launch/fsdp2_*.yaml "
            f"overlays set), or {key}: 0"
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        check_lora_targets(self.model, self.config.adversaries)  # a typo fails here, not at a random later step
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if self._entropy_tokens is not None and head is not None:  # else checked at the first TR loss
            self._entropy_tokens.check_vocab(head.weight.shape[0])
        if self.reference_model is not None and self._fsdp2_mesh() is None:
            # Single device / DDP: next to the policy, in its dtype (Lightning's precision conversion is done now).
            weight = next(self.model.parameters())
            self.reference_model.to(device=weight.device, dtype=weight.dtype)

    # -- the frozen reference model of the representation retain term ----------------------------------------

    def _setup_reference(self, mesh) -> None:
        """Builds the frozen reference model (once; nothing to do without ``config.retain_representation``).

        Called from :meth:`configure_model`, before Lightning restores any checkpoint into the policy, so a copy
        of the policy holds its starting weights (on resume, those of the source it was built from again).

        - Without FSDP2 (``mesh`` is None): a deep copy of the policy (``reference_model=None``), the given module
          copied, or the given source loaded; :meth:`on_fit_start` moves it next to the policy, in its dtype.
        - Under FSDP2: the reference never exists as a full copy in the module's dtype. Its structure is built on
          the meta device and sharded like the policy (same mesh and mixed-precision policy, no activation
          checkpointing), then only the local shards are allocated, on the policy's device, in the compute
          dtype (:meth:`_reference_dtypes`), and filled: from the policy's own local shards, cast
          (``reference_model=None``; the policy is sharded already), or from the given source loaded directly in
          the compute dtype (or the given module), each rank taking its shard.
        """
        if not self.config.retain_representation or self.reference_model is not None:
            return
        source = self._reference_source
        if mesh is not None:
            reference = self._sharded_reference(mesh, source)
        elif source is None:
            reference = frozen_copy(self.model)
        elif isinstance(source, nn.Module):
            reference = frozen_copy(source)
        else:  # loaded for this purpose alone: nothing else holds it, no copy needed
            reference = freeze(resolve_model(source)[0])
        object.__setattr__(self, "reference_model", reference)
        object.__setattr__(self, "_reference_source", None)
        object.__setattr__(self, "_reference_skeleton", None)

    def _reference_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """``(parameter dtype, buffer dtype)`` of the FSDP2 reference model.

        Parameters: the compute dtype, i.e. the FSDP2 ``MixedPrecisionPolicy`` param dtype when one is set (bf16
        under ``bf16-mixed``), else the policy's dtype after Lightning's precision conversion (which runs after
        :meth:`configure_model`: bf16 under ``bf16-true``). Buffers (rotary frequencies): the latter. Either way
        the reference computes exactly what a copy of the policy cast to the policy's dtype and all-gathered in
        the compute dtype computes.
        """
        trainer = self._trainer
        precision = getattr(trainer, "precision", None)
        param_dtype, _ = self.sharding.policy_dtypes(precision)
        policy_dtype = local_tensor(next(self.model.parameters())).dtype
        probe = nn.Linear(1, 1, device="meta", dtype=policy_dtype)
        plugin = getattr(trainer, "precision_plugin", None)
        module_dtype = plugin.convert_module(probe).weight.dtype if plugin is not None else policy_dtype
        return param_dtype or module_dtype, module_dtype

    def _sharded_reference(self, mesh, source: Any) -> nn.Module:
        """The FSDP2 reference model (see :meth:`_setup_reference`)."""
        param_dtype, buffer_dtype = self._reference_dtypes()
        if source is None:
            values, template = self.model, self._reference_skeleton  # the policy (sharded) and its structure
        else:
            if isinstance(source, nn.Module):
                values = source
            else:
                spec = model_source_from_mapping(source) if isinstance(source, Mapping) else source
                values = freeze(load_model(spec, dtype=param_dtype)[0])
            template = values
        reference = meta_copy(template, param_dtype=param_dtype, buffer_dtype=buffer_dtype)
        self._fully_shard(reference, mesh, activation_checkpointing=False, inference_only=True)
        reference.to_empty(device=local_tensor(next(self.model.parameters())).device)
        rank, world = mesh.get_local_rank(), mesh.size()
        given = dict(values.named_parameters())
        with torch.no_grad():
            for name, param in reference.named_parameters():
                value = given[name].detach()
                if isinstance(value, DTensor):  # the policy's shard of the same parameter (same mesh and layout)
                    shard = value.to_local()
                else:  # a full tensor: this rank's row block (FSDP2 shards dim 0 like torch.chunk)
                    blocks = torch.chunk(value, world, dim=0)
                    shard = blocks[rank] if rank < len(blocks) else value[:0]
                param.to_local().copy_(shard)
            buffers = dict(values.named_buffers())
            for name, buffer in reference.named_buffers():
                buffer.copy_(buffers[name])
        return reference

    @classmethod
    def _restore_kwargs(cls, ckpt: dict[str, Any], path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        hparams = ckpt.get("hyper_parameters") or {}
        rebuilt = "_instantiator" not in hparams and kwargs.get("model") is None and hparams.get("model") is None
        config = kwargs.get("config", hparams.get("config")) or {}
        wants = config.get("retain_representation") if isinstance(config, Mapping) else config.retain_representation
        if rebuilt and wants and kwargs.get("reference_model", hparams.get("reference_model")) is None:
            raise ConfigError(
                f"checkpoint {path!r}: this TARModule was built from an in-memory model, so its representation "
                "reference (a copy of the starting weights) is not recorded and the model would be rebuilt from the "
                "trained weights; pass model= (the starting model) or reference_model= to load_from_checkpoint"
            )
        return super()._restore_kwargs(ckpt, path, kwargs)

    def _require_reference(self) -> bool:
        """Whether the retain loss has a representation term; its reference model must have been built."""
        if not self.config.retain_representation:
            return False
        if self.reference_model is None:
            raise ConfigError(
                "TARModule: config.retain_representation needs the frozen reference model, which configure_model() "
                "builds (Lightning calls it when fit starts); call module.configure_model() before using the module "
                "outside a Trainer"
            )
        return True

    def stream_steps(self) -> dict[str, int]:
        """Micro-batches per outer step for each data stream (read by the data module)."""
        return self.config.stream_steps()

    def configure_callbacks(self):
        # Lightning verifies Trainer settings against manual optimization right after attaching model callbacks;
        # checking here lets us name the TAR-side replacement in the error instead of a generic message.
        self._check_trainer()
        return []

    def _check_trainer(self) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        check_strategy(trainer.strategy)
        if trainer.gradient_clip_val:
            raise ConfigError(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val}: TARModule clips the outer gradient itself; "
                f"remove it from the Trainer and set model.config.clip_grad_norm={trainer.gradient_clip_val} instead"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: not supported with TARModule "
                "(one batch is one outer step); raise the data module's batch_size instead"
            )
        if str(trainer.precision).startswith("16"):
            raise ConfigError(
                f"trainer.precision={trainer.precision!r}: fp16 needs a gradient scaler, which the nested adversary "
                "optimizers cannot share; use 'bf16-mixed' or 'bf16-true'"
            )

    # -- losses -------------------------------------------------------------------------------------------

    def tr_loss(self, batch: dict[str, Tensor], stream: Optional[str] = None) -> tuple[Tensor, Tensor]:
        """The tamper-resistance loss at the current (attacked) weights, and a diagnostic to log. ``stream``: the
        TR stream ``batch`` comes from, named in errors (default: ``tr_stream``)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if self.config.tr_loss == "dpo":  # rows 0..b-1 chosen (refusal), b..2b-1 rejected (harmful) of the same pairs
            if "ref_logps" not in batch:
                name = self.config.tr_stream if stream is None else stream
                where = "" if name == self.config.tr_stream else " (from tr_stream_by_data)"
                raise ConfigError(
                    f"tr_loss 'dpo' needs a preference stream as TR stream: stream {name!r}{where} is not one (a "
                    f"stream with kind: preference, whose batches carry 'ref_logps'); its batches have keys "
                    f"{sorted(batch)}"
                )
            logps = sequence_logprobs(out.logits, batch["labels"])
            half = logps.shape[0] // 2
            ref = batch["ref_logps"].to(logps.device)
            loss, reward_accuracy = dpo_loss(
                logps[:half], logps[half:], ref[:half], ref[half:], beta=self.config.dpo_beta
            )
            return loss, reward_accuracy
        if self.config.tr_loss == "max_entropy":
            loss = max_entropy_loss(out.logits, batch["attention_mask"], batch["labels"],
                                    positions=self.config.entropy_positions, tokens=self._entropy_tokens)
            return loss, -loss.detach()  # the entropy itself
        loss = negative_ce_loss(out.logits, batch["labels"])
        return loss, -loss.detach()  # the CE itself

    def retain_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """λ-free retain loss at the current weights: CE (+ representation distance to the reference)."""
        want_hidden = self._require_reference()
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=want_hidden,
            use_cache=False,
        )
        ref_hidden = None
        if want_hidden:
            with torch.no_grad():
                ref_hidden = self.reference_model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states
        return retain_loss(
            out.logits,
            batch["labels"],
            hidden_states=out.hidden_states if want_hidden else None,
            ref_hidden_states=ref_hidden,
            attention_mask=batch["attention_mask"],
            representation_weight=self.config.representation_weight,
            squared=self.config.representation_squared,
        )

    # -- the outer step -----------------------------------------------------------------------------------

    def _check_batch(self, batch: dict[str, Any]) -> None:
        for stream, n in self.stream_steps().items():
            if stream not in batch:
                raise ConfigError(
                    f"batch has no stream {stream!r} (it has {sorted(batch)}); the TAR config needs "
                    f"{sorted(self.stream_steps())}: configure it in the data module's streams"
                )
            have = batch[stream]["input_ids"].shape[0]
            if have < n:
                raise ConfigError(
                    f"stream {stream!r} supplies {have} micro-batches per outer step, TAR needs {n} "
                    f"(inner_steps × trajectories); let the data module read stream_steps() from the module"
                )

    def _check_sharded_state(self) -> None:
        """Under FSDP2, every trainable parameter must be a sharded ``DTensor`` when an outer step starts.

        The snapshot, the TR buffer, the adversary optimizers and the persistent pool keep references to the
        tensors :meth:`trainable_parameters` returns. An FSDP2 module left unsharded (a no-grad forward of the root
        that no backward followed) registers temporary full tensors instead, which the next backward frees: the
        restore would then write into freed memory. Validation reshards (``reshard_fsdp``); this is the check that
        nothing else left the model unsharded. Costs one ``isinstance`` per parameter, no device work.
        """
        if self._fsdp2_mesh() is None:
            return
        bad = [
            name for name, p in self.model.named_parameters()
            if p.requires_grad and not (isinstance(p, DTensor) and all(pl.is_shard() for pl in p.placements))
        ]
        if bad:
            raise RuntimeError(
                f"TARModule: outer step {self.global_step} under FSDP2 found {len(bad)} trainable parameters that are "
                f"not sharded DTensors (first: {bad[:3]}): an FSDP module was left unsharded, e.g. by a no-grad "
                "forward of the model outside validation. Call tar_lightning.base_module.reshard_fsdp(model) after "
                "such a forward"
            )

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        """One outer step of TAR (first order), in three phases::

            for t < T:  θ'_0 = θ (or θ + δ from the persistent pool);  θ'_{k+1} = adversary step on θ'_k, k < K
            g_TR = Σ_t Σ_{k∈E} λ_TR·w_k/T · ∇L_TR(θ'_{k+1});  θ restored    (:meth:`_attack_trajectories`)
            g    = g_TR + λ_retain·∇L_retain(θ), averaged over the ranks     (:meth:`_retain_gradient`)
                   (MUDMAN options: g_R + λ_TR·(m ⊙ g_TR)/‖g_TR‖, :meth:`_add_tr_gradient`)
            θ   ← outer optimizer step with clip(g); skipped on NaN/Inf      (:meth:`_outer_update`)

        E: the steps after which the attacker is scored (``config.tr_points()``), w their weights
        (``config.tr_weights()``). Returns the retain loss.
        """
        self._check_batch(batch)
        self._check_sharded_state()
        params = self.trainable_parameters()
        attacks = self._attack_trajectories(batch, params)
        detailed = self._detailed_logging_step()
        tr_norm = attacks.tr_grads.norm() if detailed else None  # before the retain gradient joins the buffer
        retain, parts = self._retain_gradient(batch, params, attacks.tr_grads)
        total_norm = self._outer_update(params, retain, attacks)
        self._log_step(retain.detach(), parts, attacks, tr_norm, total_norm, detailed)
        return retain.detach()

    @property
    def grad_sync(self) -> GradientSync:
        """The gradient synchronisation chosen by :meth:`configure_model` (chosen here when it was not called)."""
        if self._grad_sync is None:
            self._grad_sync = choose_gradient_sync(self.trainable_parameters())
        return self._grad_sync

    # phase 1: attack trajectories -> the tamper-resistance gradient

    def _attack_trajectories(self, batch: dict[str, dict[str, Tensor]], params: list[Tensor]) -> _Attacks:
        """For each of the T trajectories: snapshot θ, K adversary steps, the TR gradient at the evaluation
        points (accumulated in a buffer, first order), restore θ bit for bit. Returns the buffer, averaged over
        the ranks, and the per-step diagnostics (on the device: no host sync inside the loop)."""
        n_points = len(self._tr_weights)
        attacks = _Attacks(
            tr_grads=GradientBuffer(params),
            adv_losses=torch.zeros(self.config.inner_steps, device=self.device),
            tr_losses=torch.zeros(n_points, device=self.device),
            tr_diag=torch.zeros(n_points, device=self.device),
        )
        snapshot = ParameterSnapshot(params, device=self.config.snapshot_device)
        for t in range(self.config.trajectories):
            self._attack(batch, t, self._draw_trajectory(t), params, snapshot, attacks)
            snapshot.restore()
        del snapshot
        self.grad_sync.reduce_tr_gradient(attacks.tr_grads)
        return attacks

    def _draw_trajectory(self, t: int) -> _Trajectory:
        """The random choices of trajectory ``t``: adversary, LR, switch point, LoRA seed, and (with the persistent
        pool) whether it continues a stored one. A pure function of (seed, step, t): the same on every rank."""
        cfg, pool = self.config, self.adversary_pool
        # After a skipped (non-finite) step global_step is unchanged: draw fresh trajectories, not the same ones.
        gen = step_generator(cfg.seed, self.global_step, t + cfg.trajectories * self.nonfinite_guard.total)
        index = sample_adversary(cfg.adversaries, gen)
        adversary = cfg.adversaries[index]
        lr = adversary.sample_lr(gen)
        switch = adversary.switch_point(cfg.inner_steps, gen)
        init_seed = int(torch.randint(2**62, (1,), generator=gen))  # LoRA adapters: same on every rank
        plan = _Trajectory(index=index, lr=lr, switch=switch, init_seed=init_seed)
        if pool is not None:  # drawn on every step, so the sequence of draws never depends on the pool
            u = float(torch.rand((), generator=gen))
            plan.slot = int(torch.randint(2**31 - 1, (1,), generator=gen))
            probability = 1.0 if cfg.fork_every else cfg.persistent_probability  # the fork is always continued
            if len(pool) and u < probability:
                plan.resume_from = plan.slot % len(pool)
                entry = pool.entries[plan.resume_from]
                plan.index, plan.lr, plan.switch = entry.adversary, entry.lr, None
                plan.start = entry.steps
        return plan

    def _attack(self, batch: dict[str, dict[str, Tensor]], t: int, plan: _Trajectory, params: list[Tensor],
                snapshot: ParameterSnapshot, attacks: _Attacks) -> None:
        """Trajectory ``t``: K adversary steps from θ (or from where a pooled trajectory ended), the TR gradient
        at each evaluation point; with the persistent pool, where it ended is stored.

        With ``config.long_horizon()`` (``persistent_state: full`` or the forked adversary) the trajectory is
        steps ``plan.start .. plan.start+K−1`` of one attack of ``config.attack_horizon()`` steps: its schedule is
        laid out over that attack, a continued one takes over the stored optimizer state and schedule position,
        its TR weights follow the global step, and the optimizer state is stored with the weights (at the
        training point, from which the next step starts)."""
        cfg, pool, K = self.config, self.adversary_pool, self.config.inner_steps
        long = cfg.long_horizon()
        entry = None
        if plan.resume_from is not None:
            entry = pool.apply(plan.resume_from, params)
            attacks.continued += 1
        attacks.adv_lrs.append(plan.lr)
        adversary = cfg.adversaries[plan.index]
        tr_stream = cfg.tr_stream_for(adversary)
        tr_batch = micro_batch(batch[tr_stream], t)
        weights = cfg.tr_weights(plan.start) if long else self._tr_weights
        steps = cfg.attack_horizon() if long else K
        with AdversaryRun(self.model, adversary, lr=plan.lr, steps=steps, switch_point=plan.switch, params=params,
                          seed=plan.init_seed) as run:
            if long and entry is not None and entry.optimizer is not None:
                load_optimizer_state(run.optimizer, run.trainable, entry.optimizer, run.scheduler)
            self.grad_sync.watch_adversary(run.optimizer, run.trainable)
            e = 0
            for k in range(K):
                stream = run.stream_for_step(k)
                attacks.adv_losses[k] += run.step(micro_batch(batch[stream], t * K + k)).float() / cfg.trajectories
                if k in self._tr_points:
                    self._tr_gradient(run, tr_batch, e, attacks, weights[e], tr_stream)
                    e += 1
            if pool is not None and adversary.method != "lora":
                record = dict(continued=plan.resume_from, adversary=plan.index, lr=plan.lr, steps=K, replace=plan.slot)
                if long:
                    state = optimizer_state(run.optimizer, run.trainable, run.scheduler, cfg.snapshot_device)
                    pool.record(params, snapshot, optimizer=state, **record)
                else:
                    with run.evaluation_point():
                        pool.record(params, snapshot, **record)

    def _tr_gradient(self, run: AdversaryRun, tr_batch: dict[str, Tensor], e: int, attacks: _Attacks,
                     weight: float, tr_stream: str) -> None:
        """λ_TR·w_e/T · ∇L_TR at evaluation point ``e`` (``weight`` = w_e), added to the TR buffer; scored where the
        attacker evaluates (schedule-free: x, not y), the gradient taken by the base weights (also under LoRA)."""
        T = self.config.trajectories
        with run.evaluation_point(), run.base_gradients():
            attacks.tr_grads.swap_in()
            loss, diag = self.tr_loss(tr_batch, tr_stream)
            (loss * (self.config.tr_weight * weight / T)).backward()
            attacks.tr_grads.swap_out()
        attacks.tr_losses[e] += loss.detach().float() / T
        attacks.tr_diag[e] += diag.float() / T

    # phase 2: the retain gradient

    def _retain_gradient(self, batch: dict[str, dict[str, Tensor]], params: list[Tensor],
                         tr_grads: GradientBuffer) -> tuple[Tensor, dict[str, Tensor]]:
        """λ_retain·∇L_retain at the restored weights θ, averaged over the ranks and added to the TR gradient in
        the parameters' ``.grad`` (masked and/or normalised first with ``disruption_mask`` / ``normalize_tr_grad``,
        :meth:`_add_tr_gradient`). Returns the (λ-free) retain loss and its parts."""
        cfg = self.config
        retain, parts = self.retain_objective(micro_batch(batch[cfg.retain_stream], 0))
        if cfg.disruption_mask or cfg.normalize_tr_grad:
            # the retain gradient alone first (an empty buffer), averaged over the ranks; then the TR gradient
            self.grad_sync.backward_retain(cfg.retain_weight * retain, params, GradientBuffer(params))
            self._add_tr_gradient(params, tr_grads)
        else:
            self.grad_sync.backward_retain(cfg.retain_weight * retain, params, tr_grads)
        return retain, parts

    @torch.no_grad()
    def _add_tr_gradient(self, params: list[Tensor], tr_grads: GradientBuffer) -> None:
        """``.grad ← g_R + λ_TR·(m ⊙ G)/‖G‖`` (MUDMAN), with ``.grad`` holding g_R (the averaged retain gradient)
        and ``tr_grads`` G (the averaged TR gradient, λ_TR included).

        ``normalize_tr_grad``: the factor λ_TR/‖G‖ (global 2-norm over all parameters and FSDP2 shards, taken before
        the mask), else 1. ``disruption_mask``: m = [sign(G) = sign(g_R)] per element (a parameter the retain loss
        does not reach has g_R = 0: its TR gradient is masked to 0), else 1. Both are elementwise or global, so
        each rank works on its local shards; the ranks agree because G and g_R are averaged already.
        """
        cfg = self.config
        scale = None
        if cfg.normalize_tr_grad:
            norm = tr_grads.norm()
            scale = cfg.tr_weight / norm.clamp_min(torch.finfo(norm.dtype).tiny)  # NaN stays NaN: the guard skips
        for p, g in zip(params, tr_grads.grads, strict=True):
            if g is None:
                continue
            tr = local_tensor(g)
            if cfg.disruption_mask:
                if p.grad is None:
                    tr.zero_()
                else:
                    tr.mul_(torch.sign(tr) == torch.sign(local_tensor(p.grad)))
            if scale is not None:
                tr.mul_(scale.to(tr.device))
            if p.grad is None:
                p.grad = g
            else:
                local_tensor(p.grad).add_(tr)

    # phase 3: the outer update

    def _outer_update(self, params: list[Tensor], retain: Tensor, attacks: _Attacks) -> Tensor:
        """Clip the outer gradient and take one outer optimizer step (and LR-scheduler step), unless the
        non-finite guard skips it: the weights then stay the snapshot's. Returns the outer gradient's norm."""
        optimizer = self.optimizers()
        total_norm = self.grad_sync.clip_outer_gradient(params, self.config.clip_grad_norm, self.device)
        guard = self.nonfinite_guard
        skipped = guard.check(self.global_step, retain, attacks.adv_losses, attacks.tr_losses, total_norm)
        self.log("train/nonfinite_skipped", float(skipped), on_step=True, on_epoch=False)
        self.log("train/nonfinite_total", float(guard.total), on_step=True, on_epoch=False)
        guard.stop_if_exhausted(self.global_step)
        if skipped:
            optimizer.zero_grad(set_to_none=True)  # the weights are the snapshot's (restored): skip the update
            return total_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return total_norm

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        check_finite(checkpoint.get("state_dict", {}), f"a TARModule checkpoint at step {self.global_step}")
        checkpoint["tar_nonfinite"] = self.nonfinite_guard.state_dict()
        if self.adversary_pool is not None:
            if has_sharded_parameters(self.trainable_parameters()):  # each rank's deltas are its own shards
                self._check_pool_checkpointing()  # also for a trainer.save_checkpoint(...) without a callback
                checkpoint.setdefault(RANK_LOCAL_KEY, {})["adversary_pool"] = self.adversary_pool.state_dict()
            else:  # the same on every rank
                checkpoint["tar_adversary_pool"] = self.adversary_pool.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.nonfinite_guard.load_state_dict(checkpoint.get("tar_nonfinite", {}))
        if self.adversary_pool is not None:
            local = checkpoint.get(RANK_LOCAL_KEY)
            state = local.get("adversary_pool") if isinstance(local, dict) else None
            if state is None:
                state = checkpoint.get("tar_adversary_pool")
            if state is not None:
                self.adversary_pool.load_state_dict(state, self.trainable_parameters())

    def _detailed_logging_step(self) -> bool:
        """Whether this step's per-inner-step curves and gradient norms are logged.

        Each ``self.log`` costs ~0.3 ms in Lightning; at K=64 the per-step curves are ~100 calls, so they (and
        the gradient-norm diagnostics) are only produced on the Trainer's logging steps.
        """
        every = getattr(self._trainer, "log_every_n_steps", 1) or 1
        return (self.global_step + 1) % every == 0  # the steps on which Lightning writes to the logger

    def _log_step(self, retain: Tensor, parts: dict[str, Tensor], attacks: _Attacks, tr_norm: Optional[Tensor],
                  total_norm: Tensor, detailed: bool) -> None:
        """The step's metrics: losses, LRs and gradient norms; per-step curves on the logging steps (``detailed``)."""
        adv_losses, tr_losses, tr_diag = attacks.adv_losses, attacks.tr_losses, attacks.tr_diag
        diag_name = {"max_entropy": "entropy", "dpo": "dpo_reward_accuracy"}.get(self.config.tr_loss, "tr_ce")
        metrics = {
            "train/retain_loss": retain,
            "train/retain_ce": parts["ce"],
            "train/adv_loss_first": adv_losses[0],
            "train/adv_loss_last": adv_losses[-1],
            "train/tr_loss": tr_losses.mean(),
            f"train/{diag_name}_last": tr_diag[-1],
            "train/adv_lr": torch.tensor(float(np.mean(attacks.adv_lrs))),
        }
        if "representation" in parts:
            metrics["train/retain_representation"] = parts["representation"]
        if total_norm is not None:
            metrics["train/grad_norm"] = total_norm
        if detailed:
            metrics["train/grad_norm_tr"] = tr_norm
            for k in range(len(adv_losses)):
                metrics[f"train/adv_loss/k{k:03d}"] = adv_losses[k]
            for e, k in enumerate(sorted(self._tr_points)):
                metrics[f"train/tr_loss/k{k:03d}"] = tr_losses[e]
                metrics[f"train/{diag_name}/k{k:03d}"] = tr_diag[e]
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self.log("retain", retain, prog_bar=True, on_step=True, logger=False)
        self.log("tr", tr_losses.mean(), prog_bar=True, on_step=True, logger=False)
        if self.adversary_pool is not None:
            self.log_dict(
                {"train/pool_size": float(len(self.adversary_pool)),
                 "train/pool_continued": float(attacks.continued) / self.config.trajectories},
                on_step=True, on_epoch=False,
            )
