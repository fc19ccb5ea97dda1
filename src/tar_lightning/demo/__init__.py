"""The end-to-end demo: teach a small model two invented domains, safeguard one, red-team every defense.

``tar-lightning demo`` (:mod:`tar_lightning.demo.cli`) runs :func:`run_demo` on the invented knowledge world
(:mod:`tar_lightning.data.knowledge`; no network, no GPU):

0. **teach**: plain LM fine-tuning of a fresh tiny Llama (or a real model) on the hazardous facts of all
   pathogens (``forget_all``) and the cities' facts (``retain``), until held-out-template MCQ accuracy is high
   (:class:`~tar_lightning.safeguards.SFTModule`, the two streams at weight 0.5 each);
1. **random mapping** (:class:`~tar_lightning.safeguards.RandomMappingModule`) on ``forget_all`` vs ``retain``;
   with ``rmu.enabled`` also **RMU** (:class:`~tar_lightning.safeguards.RMUModule`), and with
   ``max_entropy.enabled`` / ``min_posterior.enabled`` the paper's **Max-Entropy** / **Min-Posterior** baselines
   (:class:`~tar_lightning.safeguards.UnlearnModule`), from the stage-0 model on the same streams, each red-teamed
   and reported as one more defense;
2. **TAR** (:class:`~tar_lightning.TARModule`) from the random-mapping model, once per train-time adversary
   family (``paper``: full-parameter AdamW on forget text at constant LRs plus a retain→forget switch;
   ``extended``: adds LoRA, warmup+cosine and ``retain_domain`` adversaries, and persistent adversaries whose
   continued trajectories keep their optimizer state, ``persistent_state: full``), with the max-entropy TR loss taken
   at the answer positions of forget sentences (``entropy_positions: labels`` over ``label_span``);
3. **red team** (:func:`~tar_lightning.evaluation.redteam.run_redteam`) on every defense (no defense = the
   stage-0 model, random mapping, TAR per family): a subset of the weaponization and durability suites, scaled
   down, their data regimes pointed at the knowledge world (the attacker trains on facts-A text) and their LRs
   multiplied for a tiny model, scored by :class:`KnowledgeEvaluator`;
4. **report**: ``report.md`` (stage table, defense × attack table of post-attack facts-B accuracy, mean, worst
   and bounded worst case, retain accuracy), ``results.json`` (every defense × attack cell) and plots.

The safety metric is the MCQ accuracy on the held-out facts of the B pathogens (``forget_B_acc``, chance
``1/n_choices``, lower is safer): the attacker never sees B, so B accuracy coming back measures latent
knowledge. Questions are scored with :func:`~tar_lightning.evaluation.mcq.score_mcq`'s ``raw`` variant (the
bare cloze stem and ``" {choice}"``; a tiny model trained only on fact sentences never saw the lm-eval format).

Every finished stage is cached under ``out/``: a stage whose configuration (and upstream stages) did not change
is loaded instead of rerun; red-team runs resume through ``run_redteam``'s own run files.

With ``workers: N`` (default 2) the stages and the attacks run on N processes as a job graph
(:mod:`tar_lightning.demo.workers`); the numbers are the same as with ``workers: 1`` (everything in this process).

Modules, each importing only those above it: :mod:`~tar_lightning.demo.io` (source fingerprints, JSON files, threads, a quiet
Lightning), :mod:`~tar_lightning.demo.evaluator` (:class:`KnowledgeEvaluator`), :mod:`~tar_lightning.demo.config`
(:class:`DemoConfig`, :func:`load_demo_config`), :mod:`~tar_lightning.demo.report` (:class:`DemoResult`, targets,
``report.md``, plots), :mod:`~tar_lightning.demo.suite` (the red-team suite), :mod:`~tar_lightning.demo.pipeline`
(:class:`DemoPipeline`, the cached stages), :mod:`~tar_lightning.demo.workers` (the process pool),
:mod:`~tar_lightning.demo.run` (:func:`run_demo`), :mod:`~tar_lightning.demo.cli` (``tar-lightning demo``).
"""

from tar_lightning.demo.cli import DEMO, demo_main
from tar_lightning.demo.config import (
    DEFAULT_CONFIG,
    DemoConfig,
    MaxEntropyStage,
    MinPosteriorStage,
    RandomMappingStage,
    RedTeamStage,
    RMUStage,
    Stage0Config,
    TARStage,
    load_demo_config,
)
from tar_lightning.demo.evaluator import CAPABILITY, SAFETY, KnowledgeEvaluator
from tar_lightning.demo.pipeline import DEFENSES_BASE, DemoPipeline
from tar_lightning.demo.report import DemoResult, demo_markdown, demo_targets
from tar_lightning.demo.run import run_demo

__all__ = [
    "CAPABILITY",
    "DEFAULT_CONFIG",
    "DEFENSES_BASE",
    "SAFETY",
    "DemoConfig",
    "DemoPipeline",
    "DemoResult",
    "KnowledgeEvaluator",
    "MaxEntropyStage",
    "MinPosteriorStage",
    "RandomMappingStage",
    "RedTeamStage",
    "RMUStage",
    "Stage0Config",
    "TARStage",
    "DEMO",
    "demo_main",
    "demo_markdown",
    "demo_targets",
    "load_demo_config",
    "run_demo",
]
