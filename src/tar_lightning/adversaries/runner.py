"""Applying one adversary to a model in place: fine-tuning (full, LoRA), a bounded activation perturbation
(embedding, latent) or refusal-direction ablation.

The same runner serves TAR's inner loop (train-time attacks) and the red team (test-time attacks), so the two
are the same code: an attack that broke a safeguard can be put into the training family unchanged. A whole
test-time attack around it (seeded learning rate, evaluations, weights put back) is
:func:`tar_lightning.adversaries.attack.run_attack`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from tar_lightning.adversaries.config import ACTIVATION_METHODS, AdversaryConfig, check_lora_targets
from tar_lightning.adversaries.optim import build_adversary_optimizer
from tar_lightning.adversaries.perturbation import ActivationPerturbation, resolve_layer
from tar_lightning.adversaries.refusal_direction import RefusalDirection
from tar_lightning.errors import ConfigError
from tar_lightning.losses import causal_lm_loss
from tar_lightning.losses._common import IGNORE_INDEX
from tar_lightning.models.layers import decoder_layers
from tar_lightning.schema import positive_int_or_none

__all__ = ["AdversaryRun", "LORA_ADAPTER_NAME", "check_adversaries"]

LORA_ADAPTER_NAME = "tar_adversary"

#: The batch entries micro-batching splits by rows (what :func:`lm_loss` reads).
_SPLIT_KEYS = ("input_ids", "attention_mask", "labels")


def check_adversaries(model: nn.Module, adversaries: list[AdversaryConfig]) -> None:
    """Checks, before any attack runs, what only the model can tell: LoRA targets that name modules
    (:func:`~tar_lightning.adversaries.config.check_lora_targets`) and the decoder layer of every ``latent`` and
    ``refusal_ablation`` adversary.

    Raises:
        ConfigError: naming the adversary and the key.
    """
    check_lora_targets(model, adversaries)
    n_layers = None
    for adversary in adversaries:
        if adversary.method in ("latent", "refusal_ablation"):
            n_layers = len(decoder_layers(model)) if n_layers is None else n_layers
            try:
                resolve_layer(getattr(adversary, adversary.method).layer, n_layers, f"{adversary.method}.layer")
            except ConfigError as err:
                raise ConfigError(f"adversary {adversary.name!r}: {err}") from None

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy of ``model`` on a ``{input_ids, attention_mask, labels}`` batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return causal_lm_loss(out.logits, batch["labels"])


@contextlib.contextmanager
def _sharded_weights_hidden(model: nn.Module) -> Iterator[None]:
    """Within the block, the FSDP2-sharded (``DTensor``) weights of ``model``'s linear layers are replaced by empty
    placeholders of the same device and dtype.

    peft sizes a LoRA adapter from the *local* shape of a ``DTensor`` weight unless the mesh is named ``fsdp``
    (it takes other meshes for tensor parallelism); FSDP2 layers compute the full projection, which their
    ``in_features``/``out_features`` give, and that is what peft uses for a plain weight. The real parameters are
    put back unchanged (the same objects FSDP manages), with the ``requires_grad`` peft gave the placeholders.
    """
    hidden = []
    for module in model.modules():
        weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if isinstance(weight, DTensor):
            module._parameters["weight"] = nn.Parameter(
                torch.empty(0, device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad
            )
            hidden.append((module, weight))
    try:
        yield
    finally:
        for module, weight in hidden:
            weight.requires_grad_(module._parameters["weight"].requires_grad)
            module._parameters["weight"] = weight


class AdversaryRun:
    """One adversary applied to ``model`` in place for ``steps`` optimizer steps.

    Full-parameter adversaries update every trainable parameter; LoRA adversaries inject fresh adapters (peft)
    into the model and train only those. Activation adversaries (``embedding``, ``latent``) attach an
    :class:`~tar_lightning.adversaries.perturbation.ActivationPerturbation` (a forward hook and its vector, the
    only trainable tensor; the weights are frozen meanwhile and never change), fix its radius on the first batch
    and project it back onto its L2 ball after every optimizer step; the hook stays until :meth:`close`.
    ``refusal_ablation`` trains nothing: each step reads one batch of harmless (before the switch point) or
    harmful prompts into :class:`~tar_lightning.adversaries.refusal_direction.RefusalDirection`, and the last of
    the ``steps`` steps orthogonalises the residual-writing weights against the estimated direction; its
    optimizer holds one empty placeholder tensor and is never stepped (it exists so callers can register
    optimizer hooks, as the red team does). The optimizer is a plain torch optimizer owned by this object, never
    registered with Lightning, and freed by :meth:`close`.

    Use as a context manager::

        with AdversaryRun(model, adv, lr=2e-5, steps=64) as run:
            for k in range(64):
                run.step(batch_for(run.stream_for_step(k)))

    Args:
        model: the causal LM to attack (modified in place).
        config: the adversary.
        lr: the learning rate of this run (sampled from ``config.lr`` by the caller).
        steps: the number of steps the schedule is laid out over.
        switch_point: for retain→forget adversaries, the first step that uses the adversary's own data.
        loss_fn: ``(model, batch) -> loss``; next-token CE by default.
        params: the parameters a full-parameter adversary trains (default: all that require grad).
        seed: seeds the LoRA adapters' initialisation (without touching the global RNG), so every rank of a
            data-parallel run starts the same adapters; ``None`` draws from the global RNG.
        micro_batch_size: split each step's batch into forward/backward passes of at most this many rows and
            accumulate their gradients before the one optimizer step (``None``: the whole batch at once). Each
            part's loss is weighted by its share of the batch's labelled tokens, so the update is the whole
            batch's token-mean gradient (up to float rounding) at a fraction of the activation memory. Only with
            the default next-token loss: another ``loss_fn`` need not be a token mean. Only ``input_ids``,
            ``attention_mask`` and ``labels`` are split. With dropout (e.g. LoRA dropout) each pass draws its own
            masks, so the update is the same in distribution, not bit for bit. An activation perturbation's radius
            is still measured on the first whole batch (a forward without autograd up to its layer), and
            ``refusal_ablation`` reads whole batches (it trains nothing). Under FSDP2 every pass gathers and
            reduces the shards again: less memory for more communication.

    Raises:
        ConfigError: LoRA requested without peft installed, LoRA targets matching no module, a ``latent`` or
            ``refusal_ablation`` layer outside the model, ``refusal_ablation`` with fewer than 2 steps, a
            ``micro_batch_size`` that is not a positive integer or comes with another ``loss_fn``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdversaryConfig,
        *,
        lr: float,
        steps: int,
        switch_point: Optional[int] = None,
        loss_fn: LossFn = lm_loss,
        params: Optional[list[nn.Parameter]] = None,
        seed: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
    ) -> None:
        positive_int_or_none(micro_batch_size, f"adversary {config.name!r}: micro_batch_size")
        if micro_batch_size is not None:
            if loss_fn is not lm_loss:
                raise ConfigError(
                    f"adversary {config.name!r}: micro_batch_size works with the next-token loss only (each "
                    "part is weighted by its labelled tokens); this run has its own loss_fn"
                )
        self.micro_batch_size = micro_batch_size
        self.model = model
        self.config = config
        self.lr = lr
        self.steps = steps
        self.switch_point = switch_point
        self.loss_fn = loss_fn
        self.steps_done = 0
        self.seed = seed
        self._lora_model = None
        self._frozen_flags: list[tuple[nn.Parameter, bool]] = []
        self.perturbation: Optional[ActivationPerturbation] = None
        self.ablation: Optional[RefusalDirection] = None
        if config.method == "lora":
            trainable = self._inject_lora()
        elif config.method in ACTIVATION_METHODS:
            trainable = self._attach_perturbation()
        elif config.method == "refusal_ablation":
            trainable = self._start_ablation()
        else:
            trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.trainable = trainable
        self.optimizer, self.scheduler = None, None
        if self.ablation is not None:  # trains nothing; an optimizer only for callers' hooks, never stepped
            self.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(0))], lr=0.0)
        else:
            try:
                self.optimizer, self.scheduler = build_adversary_optimizer(config, trainable, lr, steps)
            except BaseException:
                self.close()  # no adapters, hook or frozen weights left on the model when the optimizer fails
                raise

    # -- activation perturbations and refusal ablation ------------------------------------------------

    def _attach_perturbation(self) -> list[nn.Parameter]:
        spec = self.config.embedding if self.config.method == "embedding" else self.config.latent
        layer = getattr(spec, "layer", None)
        try:
            perturbation = ActivationPerturbation.for_method(
                self.model, self.config.method, layer, spec.epsilon, spec.relative, getattr(spec, "scope", "universal")
            )
        except ConfigError as err:
            raise ConfigError(f"adversary {self.config.name!r}: {err}") from None
        self._frozen_flags = [(p, p.requires_grad) for p in self.model.parameters() if p is not perturbation.unit]
        for p, _ in self._frozen_flags:
            p.requires_grad_(False)
        self.perturbation = perturbation
        return [perturbation.unit]

    def _start_ablation(self) -> list[nn.Parameter]:
        if self.steps < 2:
            raise ConfigError(
                f"adversary {self.config.name!r}: steps must be >= 2 for method 'refusal_ablation' (harmless and "
                f"harmful batches), got {self.steps}"
            )
        try:
            self.ablation = RefusalDirection(self.model, self.config.refusal_ablation)
        except ConfigError as err:
            raise ConfigError(f"adversary {self.config.name!r}: {err}") from None
        if self.switch_point is None:  # the harmless half first (the derived switch's fraction needs no generator)
            self.switch_point = self.config.switch_point(self.steps, torch.Generator())
        return []

    # -- LoRA -------------------------------------------------------------------------------------------

    def _inject_lora(self) -> list[nn.Parameter]:
        try:  # optional dependency: peft (the lora extra)
            from peft import LoraConfig  # optional dependency
            from peft.tuners.lora import LoraModel  # optional dependency
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(
                f"adversary {self.config.name!r} uses LoRA, which needs peft: pip install 'tar_lightning[lora]'"
            ) from e
        spec = self.config.lora
        self._frozen_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        lora_cfg = LoraConfig(
            r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.targets, bias="none"
        )
        try:
            with contextlib.ExitStack() as stack:
                if self.seed is not None:
                    stack.enter_context(torch.random.fork_rng(devices=self._devices()))
                    torch.manual_seed(self.seed)
                stack.enter_context(_sharded_weights_hidden(self.model))
                self._lora_model = LoraModel(self.model, lora_cfg, LORA_ADAPTER_NAME)
        except ValueError as e:
            raise ConfigError(
                f"adversary {self.config.name!r}: LoRA targets {spec.targets!r} cannot be applied: {e}"
            ) from e
        self._check_adapter_shapes()
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def _check_adapter_shapes(self) -> None:
        """Every adapter must be sized for its base layer's full (unsharded) projection."""
        from peft.tuners.lora import LoraLayer  # optional dependency (only reached with peft installed)

        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and LORA_ADAPTER_NAME in module.lora_A:
                base = module.get_base_layer()
                a, b = module.lora_A[LORA_ADAPTER_NAME].weight, module.lora_B[LORA_ADAPTER_NAME].weight
                want = (getattr(base, "in_features", a.shape[1]), getattr(base, "out_features", b.shape[0]))
                if (a.shape[1], b.shape[0]) != want:
                    raise ConfigError(
                        f"adversary {self.config.name!r}: the LoRA adapter of {name} maps {a.shape[1]} -> "
                        f"{b.shape[0]} features, its layer {want[0]} -> {want[1]} (peft sized it from a shard)"
                    )

    def _devices(self) -> list[int]:
        return sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})

    @contextlib.contextmanager
    def base_gradients(self) -> Iterator[None]:
        """Within the block, the base (non-adapter) weights collect gradients, the adapters do not.

        TAR's first-order tamper-resistance gradient at LoRA-attacked weights W + BA belongs to the base weight
        W (∂L/∂W equals the gradient at the effective weight); outside this block a LoRA adversary trains only
        its adapters, so the attack costs what a LoRA attack costs.
        """
        if self._lora_model is None:
            yield
            return
        for p, flag in self._frozen_flags:
            p.requires_grad_(flag)
        for p in self.trainable:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, _ in self._frozen_flags:
                p.requires_grad_(False)
            for p in self.trainable:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """Within the block the weights are the adversary's evaluation point.

        A schedule-free optimizer (``schedule_free_adamw``) trains at an interpolation y of its iterates and
        evaluates at their average x: the attack's result is x, reached with ``optimizer.eval()``; ``train()``
        moves back to y afterwards. Other optimizers have one point: nothing happens. Used by TAR to score the
        tamper-resistance loss where the attacker would evaluate, and to record persistent deltas there.
        """
        opt = self.optimizer
        swap = opt is not None and callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
        if swap:
            opt.eval()
        try:
            yield
        finally:
            if swap:
                opt.train()

    # -- stepping ---------------------------------------------------------------------------------------

    def stream_for_step(self, k: int) -> str:
        """The data stream step ``k`` trains on (the switch's retain stream before the switch point)."""
        if self.switch_point is not None and self.config.switch is not None and k < self.switch_point:
            return self.config.switch.retain_stream
        return self.config.data

    def step(self, batch: dict[str, Tensor]) -> Tensor:
        """One adversary update on ``batch``; returns the (detached) loss before the update.

        ``refusal_ablation``: reads ``batch`` (harmless before the switch point, harmful after) and returns the mean
        norm of the activations read; the last of ``steps`` steps ablates the direction from the weights.
        """
        if self.ablation is not None:
            harmful = self.stream_for_step(self.steps_done) == self.config.data
            value = self.ablation.observe(self.model, batch, harmful)
            self.steps_done += 1
            if self.steps_done == self.steps:
                self.ablation.apply(self.model)
            return value
        if self.perturbation is not None:
            self.perturbation.calibrate(self.model, batch)  # the radius, from the first batch (then a no-op)
        loss = self._backward(batch)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.perturbation is not None:
            self.perturbation.project_()
        self.steps_done += 1
        return loss

    def _backward(self, batch: dict[str, Tensor]) -> Tensor:
        """Backward of the step's loss on ``batch`` (in parts of ``micro_batch_size`` rows when it is set);
        returns the detached loss of the whole batch."""
        rows = int(batch["input_ids"].shape[0])
        size = self.micro_batch_size
        if size is None or rows <= size:
            loss = self.loss_fn(self.model, batch)
            loss.backward()
            return loss.detach()
        split = [key for key in _SPLIT_KEYS if batch.get(key) is not None]
        for key in split:
            entry = batch[key]
            if not isinstance(entry, Tensor) or entry.dim() != 2 or entry.shape[0] != rows:
                found = tuple(entry.shape) if isinstance(entry, Tensor) else type(entry).__name__
                raise ConfigError(
                    f"adversary {self.config.name!r}: micro-batching splits the batch by rows; {key!r} is {found}, "
                    f"not a [{rows}, seq_len] tensor like 'input_ids'"
                )
        # causal_lm_loss averages over the labelled next-token positions (labels[:, 1:]) of the whole batch:
        # each part's token mean, weighted by its share of those positions, sums to that average.
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        total = counts.sum().clamp(min=1).to(torch.float32)
        total_loss = torch.zeros((), device=counts.device)
        for lo in range(0, rows, size):
            part = {key: (v[lo : lo + size] if key in split else v) for key, v in batch.items()}
            share = counts[lo : lo + size].sum().to(torch.float32) / total
            loss = self.loss_fn(self.model, part) * share
            loss.backward()
            total_loss += loss.detach()
        return total_loss

    def close(self, merge: bool = False) -> None:
        """Free the optimizer; remove LoRA adapters (``merge=True`` folds them into the weights first); remove an
        activation perturbation's hook and vector and unfreeze the weights.

        Safe to call twice.

        Raises:
            ConfigError: ``merge=True`` with an activation perturbation, which is no weight and cannot be folded
                into one (nothing is closed then; evaluate with the hook in place, as ``run_attack`` does unless
                LoRA merging is asked for).
        """
        if merge and self.perturbation is not None:
            raise ConfigError(
                f"adversary {self.config.name!r}: a {self.config.method} perturbation cannot be merged into the "
                "weights; evaluate with its hook in place and call close() without merge"
            )
        if self.perturbation is not None:
            self.perturbation.remove()
            for p, flag in self._frozen_flags:
                p.requires_grad_(flag)
            self._frozen_flags = []
            self.perturbation = None
        if self.optimizer is not None:
            self.optimizer.state.clear()
            self.optimizer.param_groups.clear()
            self.optimizer = None
            self.scheduler = None
        for p in self.trainable:
            p.grad = None
        if self._lora_model is not None:
            with torch.no_grad():
                if merge:
                    self._lora_model.merge_and_unload()
                else:
                    self._lora_model.unload()
            for p, flag in self._frozen_flags:
                p.requires_grad_(flag)
            self._lora_model = None
            self._frozen_flags = []
        self.trainable = []

    def __enter__(self) -> AdversaryRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
