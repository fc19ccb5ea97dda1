"""One attack with its evaluations: :func:`run_attack`, the loop the red team and ``TamperProbe`` share.

:class:`~tar_lightning.adversaries.runner.AdversaryRun` applies an attack one step at a time (TAR's inner loop
drives it step by step); :func:`run_attack` is the whole test-time attack around it: draw the learning rate and
switch point from the run's seed, evaluate before, every ``eval_every`` steps and after, merge LoRA adapters when
asked, and optionally put the attacked weights back bit for bit (:class:`~tar_lightning.snapshot.ParameterSnapshot`).
The red team (:mod:`tar_lightning.evaluation.redteam`) and :class:`~tar_lightning.callbacks.TamperProbe` both call
it, so a probe during training and a red-team run with the same configuration and seed are the same computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.adversaries.runner import AdversaryRun
from tar_lightning.snapshot import ParameterSnapshot

__all__ = ["AttackEvaluator", "AttackOutcome", "run_attack"]

#: ``evaluate(model, optimizer, stage) -> {metric: value}`` with ``stage`` one of ``"before"``, ``"during"``,
#: ``"after"``; ``optimizer`` is the attack's during the attack (a schedule-free one is still at its training
#: point), ``None`` before and after it.
AttackEvaluator = Callable[[nn.Module, Optional[torch.optim.Optimizer], str], Mapping[str, float]]


@dataclass
class AttackOutcome:
    """What :func:`run_attack` measured.

    Attributes:
        before: the evaluation before the attack.
        after: the evaluation after it (at a schedule-free optimizer's evaluation point, LoRA merged if asked).
        trajectory: ``[[0, before], [k, during]..., [steps, after]]``.
        losses: the attack's training loss at every step (detached, on the model's device).
        lr: the learning rate drawn for this attack.
        switch_point: the first step on the adversary's own data (retain→forget attacks), else ``None``.
        steps: the number of attack steps.
    """

    before: Mapping[str, float]
    after: Mapping[str, float]
    trajectory: list[list]
    losses: list[Tensor]
    lr: float
    switch_point: Optional[int]
    steps: int


@contextlib.contextmanager
def _weights_restored(
    model: nn.Module, settle: Optional[Callable[[nn.Module], None]], device: Union[str, torch.device, None]
) -> Iterator[None]:
    """On exit the trainable parameters (bit for bit), their ``.grad`` and the train/eval mode are as on entry."""
    if settle is not None:
        settle(model)  # e.g. FSDP2: the snapshot must hold the sharded parameters, not temporary full tensors
    params = [p for p in model.parameters() if p.requires_grad]
    snapshot = ParameterSnapshot(params, device=device)
    grads = [p.grad for p in params]
    was_training = model.training
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        if settle is not None:
            settle(model)
        snapshot.restore()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        model.train(was_training)
        del snapshot


def run_attack(
    model: nn.Module,
    adversary: AdversaryConfig,
    next_batch: Callable[[str], dict[str, Tensor]],
    evaluate: AttackEvaluator,
    *,
    seed: int,
    steps: Optional[int] = None,
    before: Optional[Mapping[str, float]] = None,
    eval_every: Optional[int] = None,
    merge_lora: bool = False,
    lora_seed: Optional[int] = None,
    restore: bool = False,
    snapshot_device: Union[str, torch.device, None] = None,
    settle: Optional[Callable[[nn.Module], None]] = None,
    on_start: Optional[Callable[[AdversaryRun], None]] = None,
    on_step: Optional[Callable[[int], None]] = None,
    micro_batch_size: Optional[int] = None,
) -> AttackOutcome:
    """Attacks ``model`` in place with ``adversary`` for ``steps`` steps and evaluates it along the way.

    The learning rate (``adversary.sample_lr``) and the switch point are drawn from a generator seeded with
    ``seed``, so they do not touch the global random state; whatever else is random (LoRA initialisation without
    ``lora_seed``, dropout) draws from the global state, which the caller seeds (the red team and TamperProbe run
    the model copy, the evaluations and the attack inside
    :func:`tar_lightning.evaluation.redteam.seeded` of the run's seed).

    Order: draw lr and switch point; (``restore``: snapshot); evaluate ``"before"`` unless given; train mode;
    :class:`AdversaryRun`; ``on_start(run)``; per step ``run.step(next_batch(stream))``, ``on_step(k)`` and, every
    ``eval_every`` steps before the last, evaluate ``"during"``; a schedule-free optimizer is moved to its
    evaluation point (the attack's result); LoRA adapters are merged if ``merge_lora``; evaluate ``"after"``;
    the run is closed (adapters removed, optimizer freed); (``restore``: weights written back).

    Args:
        model: the model to attack (modified in place unless ``restore``).
        adversary: the attack.
        next_batch: ``stream -> {input_ids, attention_mask, labels}``, the next batch of a data stream.
        evaluate: ``(model, optimizer, stage) -> {metric: value}`` (:data:`AttackEvaluator`); it chooses its own
            eval mode (e.g. :func:`tar_lightning.evaluation.redteam.evaluation_mode`).
        seed: the attack's seed (learning rate and switch point).
        steps: attack steps (default ``adversary.steps``).
        before: the evaluation before the attack, if already known (it is then not recomputed).
        eval_every: evaluate during the attack every this many steps (``None``: never).
        merge_lora: fold LoRA adapters into the weights before the final evaluation.
        lora_seed: seeds the LoRA adapters' initialisation (:class:`AdversaryRun`'s ``seed``).
        restore: write the trainable parameters, their gradients and the train/eval mode back afterwards.
        snapshot_device: where the ``restore`` snapshot is kept (default: next to each parameter).
        settle: called on ``model`` before the snapshot, before the attack starts and before the restore (e.g.
            resharding FSDP2 modules that no-grad forwards left unsharded).
        on_start: called with the :class:`AdversaryRun` before its first step (e.g. to register optimizer hooks).
        on_step: called with the number of steps done after every step (e.g. a progress bar).
        micro_batch_size: run each step's batch in parts of at most this many rows, accumulating the gradient
            (:class:`AdversaryRun`; the same update, less activation memory).

    Returns:
        The :class:`AttackOutcome`.
    """
    steps = int(adversary.steps if steps is None else steps)
    gen = torch.Generator().manual_seed(seed)
    lr = adversary.sample_lr(gen)
    switch = adversary.switch_point(steps, gen)
    with contextlib.ExitStack() as stack:
        if restore:
            stack.enter_context(_weights_restored(model, settle, snapshot_device))
        if before is None:
            before = dict(evaluate(model, None, "before"))
        trajectory: list[list[Any]] = [[0, before]]
        if settle is not None:
            settle(model)  # the attack's optimizer must hold what the snapshot restores
        model.train()
        run = AdversaryRun(model, adversary, lr=lr, steps=steps, switch_point=switch, seed=lora_seed,
                           micro_batch_size=micro_batch_size)
        losses: list[Tensor] = []
        try:
            if on_start is not None:
                on_start(run)
            for k in range(steps):
                losses.append(run.step(next_batch(run.stream_for_step(k))))
                done = k + 1
                if on_step is not None:
                    on_step(done)
                if eval_every and done % eval_every == 0 and done < steps:
                    trajectory.append([done, evaluate(model, run.optimizer, "during")])
            if run.optimizer is not None and callable(getattr(run.optimizer, "eval", None)):
                run.optimizer.eval()  # schedule-free: the evaluation weights are the attack's result
            if merge_lora and adversary.method == "lora":
                run.close(merge=True)
            after = evaluate(model, None, "after")
        finally:
            run.close()
        trajectory.append([steps, after])
        del run
    return AttackOutcome(
        before=before, after=after, trajectory=trajectory, losses=losses, lr=lr, switch_point=switch, steps=steps
    )
