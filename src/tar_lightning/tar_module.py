"""``TARModule``: TAR's adversarial meta-training as a LightningModule with manual optimization.

One training batch is one outer step (TAR_METHOD.md, "Stage 2")::

    snapshot θ
    for each trajectory:            sample an adversary, its LR and switch point (same on every rank)
        for k in 0..K-1:            adversary update on its stream (fresh optimizer, never seen by Lightning)
            every tr_every steps:   ∇ λ_TR·w_k/T·L_TR(θ'_k) accumulated into the TR buffer (first order)
        restore θ (bit-exact)
    ∇ λ_retain·L_retain(θ) added to the buffer; clip; one outer optimizer step (= one global_step)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from tar_lightning.adversaries.config import check_lora_targets, sample_adversary
from tar_lightning.adversaries.runner import AdversaryRun
from tar_lightning.base_module import (
    CausalLMModule,
    ModelArg,
    OptimizerFactory,
    SchedulerFactory,
    resolve_model,
)
from tar_lightning.errors import ConfigError
from tar_lightning.losses import max_entropy_loss, negative_ce_loss, retain_loss
from tar_lightning.losses.dpo import dpo_loss, sequence_logprobs
from tar_lightning.models import ModelSource, frozen_copy
from tar_lightning.persistent import AdversaryPool
from tar_lightning.sharding import ShardingConfig, apply_activation_checkpointing, fully_shard_model
from tar_lightning.snapshot import GradientBuffer, ParameterSnapshot, local_tensor
from tar_lightning.strategy import (
    average_gradients,
    check_strategy,
    data_parallel_world_size,
    global_norm,
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


class TARModule(CausalLMModule):
    """Tamper-resistant training (TAR stage 2) of a causal LM.

    Args:
        model: the model to make tamper-resistant (usually a stage-1 safeguarded checkpoint): a source string
            (hub id, local HF folder, ``.gguf`` file, ``smollm2-135m-instruct``, ``tiny``), a
            :class:`~tar_lightning.models.ModelSource`, or an ``nn.Module``.
        config: TAR hyperparameters.
        optimizer: builds the outer optimizer from the parameters; schedule-free AdamW (lr 2e-5, 32 warmup)
            by default. Its ``train()``/``eval()`` modes, when it has them, are handled here.
        lr_scheduler: optional outer LR schedule, stepped once per outer step.
        reference_model: the frozen model of the representation retain term: ``None`` (a frozen copy of
            ``model`` as given, when ``config.retain_representation``), a source, or a module.
        tokenizer: the tokenizer (taken from the source when ``model`` is a source).
        sharding: FSDP2 mixed precision and activation checkpointing (:class:`~tar_lightning.sharding.ShardingConfig`
            or a mapping of its fields; default: bf16 params / fp32 reduce under ``bf16-mixed``, no checkpointing).

    Batches are dicts of named streams, each ``{input_ids, attention_mask, labels}`` of shape ``[n, b, L]``
    where n is what :meth:`stream_steps` asks for (:class:`~tar_lightning.data.TARDataModule` builds them).

    Raises:
        ConfigError: invalid config; ``Trainer(gradient_clip_val=...)``, ``accumulate_grad_batches > 1`` or
            fp16 mixed precision (use ``config.clip_grad_norm``; accumulation is not supported; use bf16);
            a batch lacking a stream the config needs; LoRA adversaries under FSDP2 (``ModelParallelStrategy``,
            which must have ``tensor_parallel_size=1``).

    Under ``ModelParallelStrategy`` (FSDP2), :meth:`configure_model` applies ``fully_shard`` to every decoder
    layer and the root, the reference model is sharded the same way in :meth:`on_fit_start`, FSDP averages the
    gradients itself, and the clip norm is the global one over all shards.
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
        cfg = (config if config is not None else TARConfig()).validate()
        shard_cfg = ShardingConfig.from_value(sharding)
        super().__init__(model, optimizer=optimizer, lr_scheduler=lr_scheduler, tokenizer=tokenizer)
        self.automatic_optimization = False
        self.config = cfg
        self.sharding = shard_cfg
        reference: Optional[nn.Module] = None
        if self.config.retain_representation:
            source = self.model if reference_model is None else resolve_model(reference_model)[0]
            reference = frozen_copy(source)
        # Deliberately not a registered submodule: it is frozen, never trained, never checkpointed, and stays in
        # eval mode whatever mode Lightning puts the module in. on_fit_start moves it next to the policy.
        object.__setattr__(self, "reference_model", reference)
        self.save_hyperparameters(
            {
                "config": dataclasses.asdict(self.config),
                "sharding": dataclasses.asdict(self.sharding),
                "model_source": model if isinstance(model, str) else None,
            }
        )
        self._tr_weights = self.config.tr_weights()
        self._tr_points = set(self.config.tr_points())
        self.adversary_pool = (
            AdversaryPool(cfg.persistent_pool, cfg.persistent_horizon, cfg.snapshot_device)
            if cfg.persistent_pool
            else None
        )
        self._nonfinite_in_a_row = 0  # skipped non-finite outer steps (checkpointed)
        self._nonfinite_total = 0

    # -- Lightning plumbing ---------------------------------------------------------------------------------


    def _fully_shard(self, model: nn.Module, mesh, *, activation_checkpointing: Optional[bool] = None) -> None:
        """FSDP2 with this module's :class:`ShardingConfig` (see :func:`tar_lightning.sharding.fully_shard_model`)."""
        precision = getattr(self._trainer, "precision", None) if self._trainer is not None else None
        fully_shard_model(model, mesh, self.sharding, precision, activation_checkpointing=activation_checkpointing)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shards the policy with FSDP2 (idempotent). Under every strategy:
        activation checkpointing of the decoder layers when ``sharding.activation_checkpointing``.

        The frozen reference model is sharded in :meth:`on_fit_start`, after Lightning's precision conversion
        of the policy has fixed the dtype it must match.
        """
        mesh = self._fsdp2_mesh()
        if mesh is None:
            if self.sharding.activation_checkpointing:
                apply_activation_checkpointing(self.model)
            return
        bad = [a.name for a in self.config.adversaries if a.method == "lora"]
        if bad:
            raise ConfigError(
                f"LoRA adversaries {bad} are not supported under FSDP2 yet (their adapters would be unsharded, "
                "unaveraged parameters injected into a sharded model); use full-parameter adversaries or DDP"
            )
        if self.adversary_pool is not None:
            raise ConfigError("TARConfig.persistent_pool: persistent adversaries are not supported under FSDP2 yet "
                              "(their stored deltas are not part of sharded checkpoints); set it to 0 or use DDP")
        self._fully_shard(self.model, mesh)

    def on_fit_start(self) -> None:
        check_lora_targets(self.model, self.config.adversaries)  # a typo fails here, not at a random later step
        if self.reference_model is not None:
            weight = next(self.model.parameters())
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(self.reference_model, FSDPModule):
                self.reference_model.to(device=weight.device, dtype=weight.dtype)
                mesh = self._fsdp2_mesh()
                if mesh is not None:
                    self._fully_shard(self.reference_model, mesh, activation_checkpointing=False)

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

    def tr_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The tamper-resistance loss at the current (attacked) weights, and a diagnostic to log."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if self.config.tr_loss == "dpo":  # rows 0..b-1 chosen (refusal), b..2b-1 rejected (harmful) of the same pairs
            if "ref_logps" not in batch:
                raise ConfigError(
                    f"tr_loss 'dpo' needs a preference stream as tr_stream {self.config.tr_stream!r} (a stream with "
                    "kind: preference, whose batches carry 'ref_logps'); got keys "
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
            loss = max_entropy_loss(
                out.logits, batch["attention_mask"], batch["labels"], positions=self.config.entropy_positions
            )
            return loss, -loss.detach()  # the entropy itself
        loss = negative_ce_loss(out.logits, batch["labels"])
        return loss, -loss.detach()  # the CE itself

    def retain_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """λ-free retain loss at the current weights: CE (+ representation distance to the reference)."""
        want_hidden = self.reference_model is not None
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

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        cfg = self.config
        self._check_batch(batch)
        optimizer = self.optimizers()
        params = self.trainable_parameters()
        K, T = cfg.inner_steps, cfg.trajectories
        # Under DDP the wrapper's reducer is never armed (self.model is called directly, no manual_backward):
        # gradients are averaged here, so every rank takes the same adversary and outer steps. Under FSDP2
        # (DTensor parameters) every backward reduce-scatters (averages) the gradients itself: nothing to do here.
        sharded = has_sharded_parameters(params)
        distributed = data_parallel_world_size() > 1 and not sharded

        snapshot = ParameterSnapshot(params, device=cfg.snapshot_device)
        tr_grads = GradientBuffer(params)
        # Per-step diagnostics stay on the device: no host sync inside the inner loop.
        adv_losses = torch.zeros(K, device=self.device)
        tr_losses = torch.zeros(len(self._tr_weights), device=self.device)
        tr_diag = torch.zeros(len(self._tr_weights), device=self.device)
        adv_lrs = []
        pool = self.adversary_pool
        continued = 0
        for t in range(T):
            # After a skipped (non-finite) step global_step is unchanged: draw fresh trajectories, not the same ones.
            gen = step_generator(cfg.seed, self.global_step, t + T * self._nonfinite_total)
            index = sample_adversary(cfg.adversaries, gen)
            adversary = cfg.adversaries[index]
            lr = adversary.sample_lr(gen)
            switch = adversary.switch_point(K, gen)
            tr_batch = micro_batch(batch[cfg.tr_stream], t)
            init_seed = int(torch.randint(2**62, (1,), generator=gen))  # LoRA adapters: same on every rank
            resume_from = None
            if pool is not None:  # drawn on every step, so the sequence of draws never depends on the pool
                u = float(torch.rand((), generator=gen))
                slot = int(torch.randint(2**31 - 1, (1,), generator=gen))
                if len(pool) and u < cfg.persistent_probability:
                    resume_from = slot % len(pool)
                    entry = pool.apply(resume_from, params)
                    index, lr, switch = entry.adversary, entry.lr, None
                    adversary = cfg.adversaries[index]
                    continued += 1
            adv_lrs.append(lr)
            with AdversaryRun(
                self.model, adversary, lr=lr, steps=K, switch_point=switch, params=params, seed=init_seed
            ) as run:
                if distributed:
                    run.optimizer.register_step_pre_hook(
                        lambda opt, args, kwargs, run=run: average_gradients([p.grad for p in run.trainable])
                    )
                e = 0
                for k in range(K):
                    stream = run.stream_for_step(k)
                    adv_losses[k] += run.step(micro_batch(batch[stream], t * K + k)).float() / T
                    if k in self._tr_points:
                        with run.base_gradients():
                            tr_grads.swap_in()
                            loss, diag = self.tr_loss(tr_batch)
                            (loss * (cfg.tr_weight * self._tr_weights[e] / T)).backward()
                            tr_grads.swap_out()
                        tr_losses[e] += loss.detach().float() / T
                        tr_diag[e] += diag.float() / T
                        e += 1
            if pool is not None and adversary.method != "lora":
                pool.record(params, snapshot, continued=resume_from, adversary=index, lr=lr, steps=K, replace=slot)
            snapshot.restore()
        del snapshot

        detailed = self._detailed_logging_step()
        if distributed:
            average_gradients(tr_grads.grads)
        tr_norm = tr_grads.norm() if detailed else None
        retain, parts = self.retain_objective(micro_batch(batch[cfg.retain_stream], 0))
        if not distributed:
            tr_grads.swap_in()
            (cfg.retain_weight * retain).backward()
        else:  # average the retain gradient alone, then add the (already averaged) TR buffer
            (cfg.retain_weight * retain).backward()
            average_gradients([p.grad for p in params])
            with torch.no_grad():
                for p, g in zip(params, tr_grads.grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
        # The outer gradient norm is always computed: it is the non-finite guard's check of every gradient.
        grads = [p.grad for p in params if p.grad is not None]
        if sharded:  # the global norm over all shards; scale each rank's local shards by the same factor
            total_norm = global_norm(grads) if grads else torch.zeros((), device=self.device)
            if cfg.clip_grad_norm is not None and grads:
                coef = torch.clamp(cfg.clip_grad_norm / (total_norm + 1e-6), max=1.0)
                torch._foreach_mul_([local_tensor(g) for g in grads], coef)
        else:
            total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            if cfg.clip_grad_norm is not None and grads:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad_norm, total_norm)
        if self._nonfinite_step(retain, adv_losses, tr_losses, total_norm):
            optimizer.zero_grad(set_to_none=True)  # the weights are the snapshot's (restored above): skip the update
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()

        self._log_step(
            retain.detach(), parts, adv_losses, tr_losses, tr_diag, tr_norm, total_norm, adv_lrs, detailed
        )
        if pool is not None:
            self.log_dict(
                {"train/pool_size": float(len(pool)), "train/pool_continued": float(continued) / T},
                on_step=True, on_epoch=False,
            )
        return retain.detach()

    def _nonfinite_step(self, retain: Tensor, adv_losses: Tensor, tr_losses: Tensor, total_norm: Tensor) -> bool:
        """Whether this outer step saw a NaN/Inf (any rank): then it is counted, logged and must be skipped.

        One host sync per outer step (the flags are reduced on the device first; all-reduced over ranks, so every
        rank takes the same decision). Raises :class:`~tar_lightning.checkpoint.NonFiniteError` after
        ``config.max_nonfinite_in_a_row`` skipped steps in a row.
        """
        with torch.no_grad():
            checks = torch.stack([retain.detach().float().sum(), adv_losses.sum(), tr_losses.sum(),
                                  local_tensor(total_norm).detach().float().to(adv_losses.device)])
            flag = (~torch.isfinite(checks)).any().float()
            if data_parallel_world_size() > 1:
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skipped = bool(flag.item())
        if skipped:
            self._nonfinite_in_a_row += 1
            self._nonfinite_total += 1
            names = ["retain loss", "adversary losses", "tamper-resistance losses", "outer gradient norm"]
            which = [n for n, ok in zip(names, torch.isfinite(checks).tolist(), strict=True) if not ok]
            rank_zero_warn(
                f"TARModule: non-finite {', '.join(which) or 'values on another rank'} at outer step "
                f"{self.global_step}: update skipped, weights restored ({self._nonfinite_in_a_row} in a row, "
                f"{self._nonfinite_total} in total)"
            )
        else:
            self._nonfinite_in_a_row = 0
        self.log("train/nonfinite_skipped", float(skipped), on_step=True, on_epoch=False)
        self.log("train/nonfinite_total", float(self._nonfinite_total), on_step=True, on_epoch=False)
        limit = self.config.max_nonfinite_in_a_row
        if self._nonfinite_in_a_row >= limit:
            from tar_lightning.checkpoint import NonFiniteError

            raise NonFiniteError(
                f"TAR training stopped at outer step {self.global_step}: {self._nonfinite_in_a_row} outer steps in "
                f"a row had NaN/Inf losses or gradients (max_nonfinite_in_a_row={limit}); the weights are those "
                "before these steps. Lower the adversary or outer learning rates, or set clip_grad_norm"
            )
        return skipped

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        from tar_lightning.checkpoint import check_finite

        check_finite(checkpoint.get("state_dict", {}), f"a TARModule checkpoint at step {self.global_step}")
        checkpoint["tar_nonfinite"] = {"in_a_row": self._nonfinite_in_a_row, "total": self._nonfinite_total}
        if self.adversary_pool is not None:
            checkpoint["tar_adversary_pool"] = self.adversary_pool.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("tar_nonfinite", {})
        self._nonfinite_in_a_row = int(state.get("in_a_row", 0))
        self._nonfinite_total = int(state.get("total", 0))
        if self.adversary_pool is not None and "tar_adversary_pool" in checkpoint:
            self.adversary_pool.load_state_dict(checkpoint["tar_adversary_pool"], self.trainable_parameters())

    def _detailed_logging_step(self) -> bool:
        """Whether this step's per-inner-step curves and gradient norms are logged.

        Each ``self.log`` costs ~0.3 ms in Lightning; at K=64 the per-step curves are ~100 calls, so they (and
        the gradient-norm diagnostics) are only produced on the Trainer's logging steps.
        """
        every = getattr(self._trainer, "log_every_n_steps", 1) or 1
        return (self.global_step + 1) % every == 0  # the steps on which Lightning writes to the logger

    def _log_step(self, retain, parts, adv_losses, tr_losses, tr_diag, tr_norm, total_norm, adv_lrs,
                  detailed) -> None:
        diag_name = {"max_entropy": "entropy", "dpo": "dpo_reward_accuracy"}.get(self.config.tr_loss, "tr_ce")
        metrics = {
            "train/retain_loss": retain,
            "train/retain_ce": parts["ce"],
            "train/adv_loss_first": adv_losses[0],
            "train/adv_loss_last": adv_losses[-1],
            "train/tr_loss": tr_losses.mean(),
            f"train/{diag_name}_last": tr_diag[-1],
            "train/adv_lr": torch.tensor(float(np.mean(adv_lrs))),
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
