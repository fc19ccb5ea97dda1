"""A mini red team during training: how fast does a short attack undo the safeguard right now?"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from tar_lightning.adversaries.attack import run_attack
from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.adversaries.runner import AdversaryRun
from tar_lightning.base_module import reshard_fsdp
from tar_lightning.common import is_int
from tar_lightning.data.sources import DataSource, as_source, load_records
from tar_lightning.data.tokenize import TokenPool, tokenize_records
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.mcq import load_mcq, score_mcq
from tar_lightning.evaluation.redteam.batches import AttackBatches, run_seed, seeded
from tar_lightning.evaluation.redteam.metrics import evaluation_mode
from tar_lightning.losses import causal_lm_loss
from tar_lightning.schema import positive_int_or_none
from tar_lightning.strategy import average_gradients, data_parallel_world_size, has_sharded_parameters

__all__ = ["TamperProbe"]

_DEFAULT_ATTACK = {"name": "probe", "data": "forget", "optimizer": "adamw", "lr": 2e-5}


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is (partly) FSDP2-sharded: no rank holds all of its weights, nor can copy them."""
    return has_sharded_parameters(list(model.parameters())) or any(isinstance(m, FSDPModule) for m in model.modules())


class TamperProbe(L.Callback):
    """Every ``every_n_steps`` outer steps, attacks the weights and logs how much the attack recovered.

    The probe runs at the end of a training batch (TAR has restored the weights by then). The attack is
    :func:`~tar_lightning.adversaries.attack.run_attack` (the red team's attack loop, around
    :class:`~tar_lightning.adversaries.AdversaryRun`, the runner of TAR's inner loop) on seeded shuffled batches
    (:class:`~tar_lightning.evaluation.redteam.AttackBatches`), seeded as a red-team run is
    (:func:`~tar_lightning.evaluation.redteam.seeded`). The live model's weights,
    gradients, train/eval mode and the global random state are the same after a probe as before it.

    - Plain parameters (one device, DDP): rank 0 attacks a deep copy of ``pl_module.model``, freed afterwards;
      the other ranks do not probe.
    - Sharded parameters (FSDP2 ``DTensor`` shards, where no rank can copy the model): every rank probes, in
      lockstep, the live model in place. Each rank snapshots its shards of the trainable parameters
      (:class:`~tar_lightning.snapshot.ParameterSnapshot`, on ``pl_module.config.snapshot_device`` when the
      module has one), the attack trains the sharded model (FSDP averages the sharded gradients; replicated
      trainable tensors such as LoRA adapters, initialised alike on every rank from the probe's seed, are
      averaged before each step), and the snapshot is written back bit-exactly, ``.grad`` is put back as it was
      and every FSDP module is resharded (what the next outer step requires). Held-out losses are token-weighted
      over all ranks' examples and the attack losses averaged over ranks, so every rank holds the same metrics;
      MCQ scoring and the ``evaluator`` run on every rank (they must run the same forwards on every rank: these
      are collectives) and rank 0's values are logged.

    Logged to the trainer's loggers at the probed steps (rank 0 only; the latest values are also in
    ``trainer.callback_metrics``: on rank 0, and on every rank under sharded parameters), with ``<p>`` =
    ``prefix``:

    - ``<p>/forget_loss_before`` and ``<p>/forget_loss``: token-weighted mean next-token CE on the held-out
      examples before and after the attack;
    - ``<p>/forget_loss_drop``: before minus after (how much the attack recovered);
    - ``<p>/attack_loss_first`` / ``<p>/attack_loss_last``: the attack's own training loss;
    - ``<p>/mcq_acc_before`` and ``<p>/mcq_acc`` when ``mcq`` is configured;
    - ``<p>/<key>`` for every value a custom ``evaluator`` returns after the attack.

    Where the data comes from: a *name* (``attack["data"]``, ``eval_data``) is looked up in ``sources``, then
    among the data module's streams (its tokenized pools / sources); when neither has it, the stream of the
    current training batch is used (its micro-batches; the held-out examples are fixed at the first probe).
    Under data parallelism that batch is the rank's own slice of the global batch: a rank-0-only probe (DDP) then
    evaluates and attacks rank 0's rows only; a sharded probe evaluates the union of the ranks' held-out rows and
    attacks with every rank's rows at once (the rank-averaged gradient, which is the global batch's gradient when
    the ranks hold equal token counts). Sources and data-module streams are read whole by every rank.

    Args:
        every_n_steps: probe when ``global_step`` is a multiple of this (after the outer step).
        attack: :class:`~tar_lightning.adversaries.AdversaryConfig` fields (or one); default full-parameter
            AdamW 2e-5 on the ``forget`` stream.
        steps: attack steps.
        batch_size: attack batch size (ignored when the attack reads the training batch's micro-batches).
        eval_data: held-out text: a stream/source name (default ``tr``, TAR's held-out forget text), a path or
            DataSource fields.
        sources: extra named sources (name -> path or DataSource fields) for attack or evaluation data.
        seq_len: tokens per example when tokenizing sources (default: the data module's, else 256).
        eval_batch_size: evaluation batch size.
        eval_limit: held-out examples evaluated.
        mcq: optional multiple-choice evaluation ``{path, limit, options}`` (``tar_lightning.evaluation.mcq``).
        seed: probe seed; the probe at step ``s`` is seeded from ``(seed, s)``.
        probe_at_start: also probe once before the first outer step.
        prefix: namespace of the logged metrics.
        evaluator: optional ``fn(model, tokenizer) -> {name: value}`` evaluated after the attack as well.
        micro_batch_size: run each attack step in passes of at most this many rows, accumulating the gradient
            (the same update, less activation memory; :class:`~tar_lightning.adversaries.AdversaryRun`).

    Raises:
        ConfigError: invalid arguments or attack configuration.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        attack: Union[None, dict, AdversaryConfig] = None,
        steps: int = 16,
        batch_size: int = 4,
        eval_data: Union[str, dict] = "tr",
        sources: Optional[dict] = None,
        seq_len: Optional[int] = None,
        eval_batch_size: int = 8,
        eval_limit: int = 32,
        mcq: Optional[dict] = None,
        seed: int = 0,
        probe_at_start: bool = False,
        prefix: str = "probe",
        evaluator: Optional[Callable] = None,
        micro_batch_size: Optional[int] = None,
    ) -> None:
        positive_int_or_none(micro_batch_size, "TamperProbe.micro_batch_size")
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("steps", steps),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("eval_limit", eval_limit),
        ):
            if not is_int(value) or value < 1:
                raise ConfigError(f"TamperProbe.{name} must be an integer >= 1, got {value!r}")
        if isinstance(attack, AdversaryConfig):
            adversary = copy.deepcopy(attack)
        else:
            fields = {**_DEFAULT_ATTACK, **dict(attack or {})}
            adversary = AdversaryConfig.from_dict(fields, where="TamperProbe.attack")
        adversary.steps = steps
        adversary.batch_size = batch_size
        try:
            adversary.validate()
        except ConfigError as err:
            raise ConfigError(f"TamperProbe.attack: {err}") from None
        if mcq is not None and (not isinstance(mcq, Mapping) or "path" not in mcq):
            raise ConfigError(f"TamperProbe.mcq must be a mapping with at least 'path', got {mcq!r}")
        self.every_n_steps = every_n_steps
        self.adversary = adversary
        self.steps = steps
        self.batch_size = batch_size
        self.eval_data = eval_data
        self.sources = {str(k): as_source(v, f"TamperProbe.sources[{k!r}]") for k, v in (sources or {}).items()}
        self.seq_len = seq_len
        self.eval_batch_size = eval_batch_size
        self.eval_limit = eval_limit
        self.mcq = dict(mcq) if mcq is not None else None
        self.seed = int(seed)
        self.probe_at_start = probe_at_start
        self.prefix = prefix
        self.evaluator = evaluator
        self.micro_batch_size = micro_batch_size
        self.history: list[dict[str, float]] = []
        self._eval_batches: Optional[list[dict[str, torch.Tensor]]] = None
        self._pools: dict[str, TokenPool] = {}
        self._mcq_items: Any = None

    # -- data ---------------------------------------------------------------------------------------------
    def _seq_len(self, trainer: L.Trainer) -> int:
        if self.seq_len is not None:
            return self.seq_len
        return int(getattr(getattr(trainer, "datamodule", None), "seq_len", 256) or 256)

    def _source(self, trainer: L.Trainer, ref: Union[str, Mapping]) -> Optional[DataSource]:
        if isinstance(ref, Mapping):
            return as_source(ref, "TamperProbe data")
        if ref in self.sources:
            return self.sources[ref]
        dm = getattr(trainer, "datamodule", None)
        for attr in ("streams", "val_streams"):
            streams = getattr(dm, attr, None) or {}
            if ref in streams:
                return streams[ref]
        if "/" in ref or ":" in ref or "." in ref:
            return as_source(ref, "TamperProbe data")
        return None

    def _pool(self, trainer: L.Trainer, tokenizer: Any, name: str) -> Optional[TokenPool]:
        if name in self._pools:
            return self._pools[name]
        dm = getattr(trainer, "datamodule", None)
        pools = getattr(dm, "pools", None) or {}
        if name not in self.sources and name in pools:
            return pools[name]
        source = self._source(trainer, name)
        if source is None:
            return None
        self._pools[name] = TokenPool(tokenize_records(load_records(source), source, tokenizer, self._seq_len(trainer)))
        return self._pools[name]

    def _held_out(self, trainer: L.Trainer, tokenizer: Any, batch: Mapping) -> list[dict[str, torch.Tensor]]:
        if self._eval_batches is not None:
            return self._eval_batches
        ref = self.eval_data
        source = self._source(trainer, ref)
        out: list[dict[str, torch.Tensor]] = []
        if source is not None:
            pool = TokenPool(
                tokenize_records(load_records(source), source, tokenizer, self._seq_len(trainer))[: self.eval_limit]
            )
            pad = int(tokenizer.pad_token_id)
            for lo in range(0, len(pool), self.eval_batch_size):
                out.append(pool.collate(list(range(lo, min(len(pool), lo + self.eval_batch_size))), pad))
        elif isinstance(ref, str) and ref in batch:
            stream = batch[ref]
            taken = 0
            for i in range(stream["input_ids"].shape[0]):
                mb = {k: v[i].detach().cpu().clone() for k, v in stream.items()}
                out.append({k: v[: self.eval_limit - taken] for k, v in mb.items()})
                taken += out[-1]["input_ids"].shape[0]
                if taken >= self.eval_limit:
                    break
        else:
            raise ConfigError(
                f"TamperProbe: held-out data {ref!r} is neither a source nor a stream of the data module or of the "
                f"training batch (batch streams: {sorted(batch) if isinstance(batch, Mapping) else '?'})"
            )
        self._eval_batches = out
        return out

    # -- evaluation ---------------------------------------------------------------------------------------
    @staticmethod
    def _heldout_loss(
        model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, across_ranks: bool = False
    ) -> float:
        """Token-weighted mean next-token CE on ``batches``; ``across_ranks``: over every rank's batches (every
        rank must then call this, with the same number of batches)."""
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                n = int((b["labels"][:, 1:] != -100).sum())
                total += float(causal_lm_loss(logits, b["labels"])) * n
                count += n
        model.train(was_training)
        if across_ranks and data_parallel_world_size() > 1:
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        return total / max(count, 1)

    def _mcq_acc(self, model: nn.Module, tokenizer: Any) -> Optional[float]:
        if self.mcq is None:
            return None
        if self._mcq_items is None:
            self._mcq_items = load_mcq(self.mcq["path"], limit=self.mcq.get("limit"))
        options = dict(self.mcq.get("options") or {})
        options.setdefault("batch_size", self.eval_batch_size)
        return float(score_mcq(model, tokenizer, self._mcq_items, **options).accuracy)

    # -- the probe ----------------------------------------------------------------------------------------
    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Mapping) -> dict[str, float]:
        """Runs one probe and returns its metrics (also appended to ``history``).

        The attack is :func:`~tar_lightning.adversaries.attack.run_attack`, the red team's loop. Under sharded
        (FSDP2) parameters every rank must call this at the same step (it runs collectives); the live model is
        attacked in place and its trainable shards, ``.grad`` and train/eval mode are written back afterwards
        (``run_attack(restore=True)``, every FSDP module resharded first).
        """
        live: nn.Module = pl_module.model
        tokenizer = getattr(pl_module, "tokenizer", None)
        sharded = _is_sharded(live)
        world = data_parallel_world_size() if sharded else 1
        device = next(live.parameters()).device
        adv = self.adversary
        step = int(trainer.global_step)
        seed = run_seed(self.seed, adv.name, step)
        streams = [adv.data] + ([adv.switch.retain_stream] if adv.switch else [])
        with seeded(seed):
            if sharded:
                model = live
            else:
                model = copy.deepcopy(live)
                for p in model.parameters():
                    p.grad = None
            held_out = self._held_out(trainer, tokenizer, batch)
            pools = {}
            in_batch = {}
            for s in streams:
                pool = self._pool(trainer, tokenizer, s) if tokenizer is not None else None
                if pool is not None:
                    pools[s] = pool
                elif isinstance(batch, Mapping) and s in batch:
                    in_batch[s] = batch[s]
                else:
                    raise ConfigError(
                        f"TamperProbe: attack data {s!r} is neither a source nor a stream of the data module or of "
                        "the training batch"
                    )
            batches = (
                AttackBatches(pools, self.batch_size, seed, int(tokenizer.pad_token_id), device=device)
                if pools
                else None
            )
            counters = {s: 0 for s in in_batch}

            def next_batch(stream: str) -> dict[str, torch.Tensor]:
                if stream in in_batch:
                    data = in_batch[stream]
                    i = counters[stream] % data["input_ids"].shape[0]
                    counters[stream] += 1
                    return {k: v[i].to(device) for k, v in data.items()}
                return batches.next(stream)

            def evaluate(m: nn.Module, optimizer: Any, stage: str) -> dict[str, float]:
                out: dict[str, float] = {}
                if stage == "before":
                    out["forget_loss_before"] = self._heldout_loss(m, held_out, device, across_ranks=sharded)
                    acc = self._mcq_acc(m, tokenizer)
                    if acc is not None:
                        out["mcq_acc_before"] = acc
                    return out
                with evaluation_mode(m):  # after (no evaluation during the attack)
                    out["forget_loss"] = self._heldout_loss(m, held_out, device, across_ranks=sharded)
                    acc = self._mcq_acc(m, tokenizer)
                    if acc is not None:
                        out["mcq_acc"] = acc
                    if self.evaluator is not None:
                        for key, value in dict(self.evaluator(m, tokenizer)).items():
                            out[str(key)] = float(value)
                return out

            def average_replicated(run: AdversaryRun) -> None:
                # FSDP averages the sharded parameters' gradients; replicated trainable tensors (LoRA adapters) are
                # averaged here, so every rank takes the same step.
                replicated = [p for p in run.trainable if not hasattr(p, "full_tensor")]
                if replicated:
                    run.optimizer.register_step_pre_hook(
                        lambda opt, args, kwargs, ps=replicated: average_gradients([p.grad for p in ps])
                    )

            outcome = run_attack(
                model,
                adv,
                next_batch,
                evaluate,
                seed=seed,
                steps=self.steps,
                lora_seed=seed if sharded else None,
                restore=sharded,
                snapshot_device=getattr(getattr(pl_module, "config", None), "snapshot_device", None),
                # no-grad forwards leave the FSDP root unsharded: the snapshot, the attack's optimizer and the
                # restore must all see the sharded parameters
                settle=reshard_fsdp if sharded else None,
                on_start=average_replicated if world > 1 else None,
                micro_batch_size=self.micro_batch_size,
            )
            metrics: dict[str, float] = {**outcome.before, **outcome.after}
            metrics["forget_loss_drop"] = metrics["forget_loss_before"] - metrics["forget_loss"]
            first_last = torch.stack([outcome.losses[0], outcome.losses[-1]]).double()
            if world > 1:  # each rank's loss on its own batch: their mean (the rank-averaged objective)
                torch.distributed.all_reduce(first_last)
                first_last /= world
            metrics["attack_loss_first"] = float(first_last[0])
            metrics["attack_loss_last"] = float(first_last[1])
            del outcome, model
        self.history.append({"step": step, **metrics})
        return metrics

    def _maybe_probe(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, force: bool) -> None:
        if trainer.sanity_checking:
            return
        if not force and (trainer.global_step == 0 or trainer.global_step % self.every_n_steps != 0):
            return
        # Sharded parameters: every rank probes (in place, in lockstep); otherwise rank 0 probes a copy.
        if trainer.global_rank != 0 and not _is_sharded(pl_module.model):
            return
        metrics = self.probe(trainer, pl_module, batch)
        named = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}
        if trainer.global_rank == 0:
            # Straight to the loggers (as LearningRateMonitor does): values logged through pl_module.log from a
            # callback that logs only every N steps would be repeated in the rows of the steps in between. The step
            # is the one Lightning logs this batch's training metrics under.
            step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
            for logger in trainer.loggers:
                logger.log_metrics(named, step=step)
        # Latest values, for ModelCheckpoint(monitor="probe/forget_loss") and the progress bar's callers.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.probe_at_start and not self.history and trainer.global_step == 0:
            self._maybe_probe(trainer, pl_module, batch, force=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_probe(trainer, pl_module, batch, force=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def __repr__(self) -> str:
        return f"TamperProbe(every_n_steps={self.every_n_steps}, attack={dataclasses.asdict(self.adversary)})"
