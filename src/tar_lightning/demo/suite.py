"""The demo's red-team suite on the invented knowledge world, and its data sources.

:func:`build_suite` takes the attacks the demo configuration names from the shipped suites, multiplies their
learning rates for a tiny model, points their data regimes at the knowledge world (the attacker trains on facts-A
text) and scales them down; :func:`knowledge_source` is a split of the world as a
:class:`~tar_lightning.data.sources.DataSource`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from tar_lightning.adversaries.config import ACTIVATION_METHODS
from tar_lightning.data.sources import DataSource
from tar_lightning.demo.config import DemoConfig
from tar_lightning.demo.evaluator import CAPABILITY, SAFETY
from tar_lightning.evaluation.suite import EvaluationSpec, ScoreSpec, Suite, load_suite

__all__ = ["build_suite", "knowledge_source"]


def knowledge_source(split: str, world: Mapping, **kw: Any) -> DataSource:
    """Split ``split`` of the knowledge world ``world`` (``build_world`` arguments); ``kw``: more
    :class:`~tar_lightning.data.sources.DataSource` fields (``label_span``, ``limit``)."""
    return DataSource(path=f"knowledge:{split}", knowledge=dict(world), **kw)


#: optimizers whose LR is a dimensionless factor of a self-normalised step (Adadelta: 1.0 at every model size), so
#: the demo's ``lr_multiplier`` (for LRs chosen for 8B models) does not apply to them
SCALE_FREE_LR = ("adadelta",)


def build_suite(cfg: DemoConfig) -> Suite:
    """The demo's red-team suite: the attacks ``cfg.redteam.attacks`` names, their fine-tuning LRs (and the LR
    ranges of searches and sweeps) multiplied by ``lr_multiplier`` (not the LR of an embedding/latent perturbation,
    which is in units of its radius, nor Adadelta's, :data:`SCALE_FREE_LR`), their data regimes pointed at the knowledge world, scaled by ``scale``."""
    r = cfg.redteam
    attacks, regimes = [], {}
    for suite_name, ids in r.attacks.items():
        loaded = load_suite(suite_name).select(list(ids))
        regimes.update(loaded.data)
        for attack in loaded.attacks:
            attack = copy.deepcopy(attack)
            adv = attack.adversary
            if adv.method in ACTIVATION_METHODS or adv.method == "refusal_ablation" or adv.optimizer in SCALE_FREE_LR:
                # an activation perturbation's LR is in units of its radius and Adadelta's scales a self-normalised
                # step (no model-size scale in either); ablation has none
                attack.comment = f"[{suite_name}] {attack.comment}"
                attacks.append(attack)
                continue
            adv.lr = [x * r.lr_multiplier for x in adv.lr] if isinstance(adv.lr, list) else adv.lr * r.lr_multiplier
            for space in (attack.search, attack.sweep):
                if space is not None:
                    space.lr = tuple(x * r.lr_multiplier for x in space.lr)
            attack.comment = f"[{suite_name}] {attack.comment} (LR x{r.lr_multiplier:g} for this model)"
            attacks.append(attack)
    w = cfg.world
    knowledge = {
        "forget": knowledge_source("forget_A", w),
        "ood_forget": knowledge_source("forget_A", w),  # the world has no second forget corpus: A again
        "heldout_forget": knowledge_source("forget_B", w),
        "retain_domain": knowledge_source("retain_domain", w),
        "retain_eval": knowledge_source("retain", w),
        "unrelated": knowledge_source("retain", w, limit=r.unrelated_examples),
    }
    regimes = {k: knowledge.get(k, v) for k, v in regimes.items()}
    n_choices = int(w.get("n_choices", 4))
    evaluation = EvaluationSpec(
        metrics={},
        safety=ScoreSpec(SAFETY, "lower_is_better", r.recovery_threshold, 1.0 / n_choices),
        capability=ScoreSpec(CAPABILITY, "higher_is_better"),
        capability_floor=r.capability_floor,
        loss_metric="forget_loss",
        during=list(r.during) if r.during is not None else None,
    )
    suite = Suite(
        name="demo",
        attacks=attacks,
        data=regimes,
        evaluation=evaluation,
        seeds=list(range(r.seeds)),
        seed=cfg.seed,
        seq_len=cfg.seq_len,
        eval_every=r.eval_every if r.eval_every is not None else 100,
        description="weaponization + durability attacks, scaled down, on the knowledge world",
    )
    return suite.scaled(r.scale, max_steps=r.max_steps, max_batch_size=r.max_batch_size)
