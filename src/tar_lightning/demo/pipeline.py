"""The demo's stage pipeline: :class:`DemoPipeline`, every stage of one configuration, cached on disk.

Stage 0 teaches a fresh model (:class:`~tar_lightning.safeguards.SFTModule`), stage 1 trains random
mapping (and, with ``rmu.enabled``, ``max_entropy.enabled`` or ``min_posterior.enabled``, the RMU, Max-Entropy or
Min-Posterior baseline: more stage-1 defenses from the stage-0 model), stage 2 TAR once per adversary family from
the random-mapping model, stage 3 red-teams every defense. Each training stage is keyed by
its configuration, its parent's key, the library version and a fingerprint of the source code it runs
(:data:`STAGE_CODE`, :meth:`DemoPipeline.keys`): a stage whose key did not change is loaded from ``out/<stage>``
instead of being trained again, and a red team from ``out/redteam/<defense>``. After a library upgrade or an edit
of a stage's code, that stage and every stage after it run again (the demo says so: ``stage X: code changed since
the cached run; retraining``), so results of old code are never reused.

:meth:`DemoPipeline.run_in_process` runs everything in this process; :mod:`tar_lightning.demo.workers` runs the
same stage methods on worker processes. Progress: one bar per training stage, counting its optimizer steps
(:class:`StepProgress`), and the red team's own bars.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

import tar_lightning
from tar_lightning.base_module import adamw
from tar_lightning.common import config_hash
from tar_lightning.data.datamodule import TARDataModule
from tar_lightning.demo.config import DemoConfig
from tar_lightning.demo.evaluator import CAPABILITY, SAFETY, KnowledgeEvaluator
from tar_lightning.demo.io import read_json, source_fingerprint, write_json
from tar_lightning.demo.report import FIGHT, DemoResult, format_metrics, mean_or_none
from tar_lightning.demo.suite import build_suite, knowledge_source
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.progress import progress, quiet_hf_progress
from tar_lightning.evaluation.redteam import run_redteam
from tar_lightning.evaluation.training_report import training_report
from tar_lightning.models import export_pretrained, load_model, tiny_model
from tar_lightning.safeguards.random_mapping import RandomMappingModule
from tar_lightning.safeguards.rmu import RMUModule
from tar_lightning.safeguards.sft import SFTModule, warmup_cosine
from tar_lightning.safeguards.unlearn import FORGET_LOSSES, UnlearnModule
from tar_lightning.tar_module import TARModule

__all__ = ["DEFENSES_BASE", "STAGE_CODE", "DemoPipeline", "StepProgress", "stage_label", "tar_streams"]

log = logging.getLogger(__name__)

#: Defenses red-teamed besides the TAR families, in report order (the opt-in ``rmu``, ``max_entropy`` and
#: ``min_posterior`` come after them: :meth:`DemoPipeline.defenses`).
DEFENSES_BASE = ("no_defense", "random_mapping")

_LABELS = {"stage0": "stage 0: teach", "random_mapping": "stage 1: random mapping", "rmu": "stage 1: RMU",
           "max_entropy": "stage 1: Max-Entropy", "min_posterior": "stage 1: Min-Posterior"}

#: The library code each kind of stage runs, beyond what its parent stage ran (a stage's key holds its parent's
#: hash, so a change upstream reruns everything below): modules, or packages with every file under them. The
#: bytes of these files are hashed into the stage's cache key (:func:`~tar_lightning.demo.io.source_fingerprint`),
#: next to the library version. ``tar`` keys every TAR family; ``redteam`` every defense's red team.
#: Code every stage runs around its training: the pipeline that builds its module, trainer and config, the
#: evaluation after it (MCQ, held-out loss) and the suite the red team is built from.
_EVERY_STAGE = ("tar_lightning.demo.pipeline", "tar_lightning.demo.evaluator", "tar_lightning.demo.suite",
                "tar_lightning.evaluation.mcq", "tar_lightning.evaluation.heldout")
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "stage0": _EVERY_STAGE + ("tar_lightning.safeguards.sft", "tar_lightning.base_module",
                              "tar_lightning.data", "tar_lightning.losses", "tar_lightning.models"),
    "random_mapping": _EVERY_STAGE + ("tar_lightning.safeguards.random_mapping", "tar_lightning.base_module",
                                      "tar_lightning.losses"),
    "rmu": _EVERY_STAGE + ("tar_lightning.safeguards.rmu", "tar_lightning.base_module", "tar_lightning.models",
                           "tar_lightning.sharding"),
    **dict.fromkeys(FORGET_LOSSES, _EVERY_STAGE + ("tar_lightning.safeguards.unlearn", "tar_lightning.base_module",
                                                   "tar_lightning.losses")),
    "tar": _EVERY_STAGE + ("tar_lightning.tar_module", "tar_lightning.tar_config", "tar_lightning.base_module",
                           "tar_lightning.adversaries", "tar_lightning.persistent", "tar_lightning.snapshot",
                           "tar_lightning.grad_sync", "tar_lightning.guards", "tar_lightning.losses"),
    "redteam": _EVERY_STAGE + ("tar_lightning.evaluation.redteam", "tar_lightning.adversaries",
                               "tar_lightning.evaluation.suite"),
}


def tar_streams(world: Mapping, entropy_positions: str) -> dict[str, Any]:
    """The data sources of the TAR stage's streams (:data:`~tar_lightning.demo.config.TAR_STREAMS`, whose names
    the configuration is checked against), the TR ones labelled at the answers with ``entropy_positions: labels``."""
    label_span = ["answer_start", "answer_end"] if entropy_positions == "labels" else None
    return {
        "retain": knowledge_source("retain", world),
        "forget": knowledge_source("forget_A", world),
        "tr": knowledge_source("forget_all", world, label_span=label_span),
        "retain_domain": knowledge_source("retain_domain", world),
        # the defender's own halves (forget_split): adversary text and TR text of each
        **{f"forget_{h}": knowledge_source(f"forget_{h}", world) for h in ("D1", "D2")},
        **{f"tr_{h}": knowledge_source(f"forget_{h}", world, label_span=label_span) for h in ("D1", "D2")},
    }


def stage_label(stage: str) -> str:
    """The progress-bar label of a training stage (``stage0``, ``random_mapping``, ``rmu``, ``max_entropy``,
    ``min_posterior``, ``tar_<family>``)."""
    return _LABELS.get(stage, f"stage 2: TAR {stage[len('tar_'):]}")


class StepProgress(L.Callback):
    """A progress bar over a training stage's ``total`` steps (:func:`~tar_lightning.evaluation.progress.progress`:
    a bar on a terminal, plain lines in a file or pipe); Lightning's own bar is off in the demo."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.bar: Any = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.bar = progress(total=self.total, desc=self.label, unit="step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _trainer(steps: int, root: Path, callbacks: Sequence[Any] = (), log_to: Optional[Path] = None) -> L.Trainer:
    """A one-process CPU trainer without checkpoints or Lightning's progress bar (the demo draws its own,
    :class:`StepProgress`); without a logger unless ``log_to`` names a folder for a CSV log of every step."""
    logger: Any = False
    if log_to is not None:
        shutil.rmtree(log_to, ignore_errors=True)  # a rerun's log replaces the old one
        logger = CSVLogger(save_dir=str(log_to.parent), name=log_to.name, version=0)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1 if log_to is not None else max(1, min(50, steps)),
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )



class DemoPipeline:
    """The stages of one demo configuration, each cached under ``config.out``.

    Args:
        config: the configuration.
        say: where progress lines go (default: printed); worker processes send them to the parent.
        train_callbacks: ``(stage name, steps) -> Lightning callbacks`` added to a stage's trainer (default: a
            :class:`StepProgress` bar when ``config.progress``, else none).
        code: the code fingerprints to key the stages with (:meth:`code_fingerprints`; worker processes get their
            parent's); default: computed from the installed source on first use.

    Attributes:
        cfg: the configuration; ``out``: the output folder (absolute); ``result``: the :class:`DemoResult` the
            stage methods fill; ``evaluator``: the :class:`KnowledgeEvaluator` every stage is scored with.
    """

    def __init__(
        self,
        config: DemoConfig,
        say: Optional[Callable[[str], None]] = None,
        train_callbacks: Optional[Callable[[str, int], Sequence[Any]]] = None,
        code: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.cfg = config
        self._code = dict(code) if code is not None else None
        self.out = Path(os.path.expanduser(config.out)).absolute()
        self.result = DemoResult(config=config, out_dir=self.out)
        self.evaluator = KnowledgeEvaluator(
            config.world, config.seq_len, config.eval_batch_size, config.mcq_limit, config.heldout_limit
        )
        self.say = say or (lambda text: print(text, flush=True))
        self.train_callbacks = train_callbacks or (
            lambda name, steps: [StepProgress(stage_label(name), steps)] if config.progress else []
        )
        self._suite = None

    # -- models ----------------------------------------------------------------------------------------
    def fresh_model(self):
        cfg = self.cfg
        if cfg.model == "tiny":
            return tiny_model("llama", seed=cfg.seed, **dict(cfg.tiny))
        model, tok = load_model(cfg.model, dtype="float32")
        return model, tok

    def _model_key(self) -> dict:
        return {"model": self.cfg.model, "tiny": dict(self.cfg.tiny) if self.cfg.model == "tiny" else None}

    def code_fingerprints(self) -> dict[str, str]:
        """Kind of stage (a key of :data:`STAGE_CODE`) -> fingerprint of its source code, computed once."""
        if self._code is None:
            self._code = {kind: source_fingerprint(modules) for kind, modules in STAGE_CODE.items()}
        return dict(self._code)

    def _code_key(self, kind: str) -> dict:
        """What a stage's key holds about the code that ran it: the library version and the fingerprint."""
        return {"version": tar_lightning.__version__, "code": self.code_fingerprints()[kind]}

    def keys(self) -> dict[str, tuple[dict, str]]:
        """Stage name -> (key, hash) for every training stage; a stage's key holds its parent's hash, the library
        version and its code fingerprint, so a change anywhere upstream (configuration or code) reruns everything
        below it."""
        cfg = self.cfg
        out: dict[str, tuple[dict, str]] = {}

        def add(name: str, key: dict) -> str:
            out[name] = (key, config_hash(key))
            return out[name][1]

        h0 = add("stage0", {"stage": 0, **self._model_key(), "world": cfg.world, "seq_len": cfg.seq_len,
                            "seed": cfg.seed, "config": dataclasses.asdict(cfg.stage0), **self._code_key("stage0")})
        h1 = add("random_mapping", {"stage": 1, "parent": h0, "config": dataclasses.asdict(cfg.random_mapping),
                                    **self._code_key("random_mapping")})
        if cfg.rmu.enabled:
            add("rmu", {"stage": 1, "method": "rmu", "parent": h0, "config": dataclasses.asdict(cfg.rmu),
                        **self._code_key("rmu")})
        for u in cfg.unlearn_stages():
            add(u.forget_loss, {"stage": 1, "method": u.forget_loss, "parent": h0, "config": dataclasses.asdict(u),
                                **self._code_key(u.forget_loss)})
        s = cfg.tar
        for family in s.run:
            key = {"stage": 2, "parent": h1, "family": family, "adversaries": s.families[family],
                   "config": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("run", "families", "options")},
                   **self._code_key("tar")}
            options = dict(s.options.get(family, {}))
            if options:
                key["options"] = options
            add(f"tar_{family}", key)
        return out

    def defenses(self) -> dict[str, str]:
        """Defense -> the training stage whose model it is, in report order: no defense, random mapping, RMU,
        Max-Entropy and Min-Posterior (each when enabled), then TAR per family."""
        rmu = {"rmu": "rmu"} if self.cfg.rmu.enabled else {}
        unlearn = {u.forget_loss: u.forget_loss for u in self.cfg.unlearn_stages()}
        return {"no_defense": "stage0", "random_mapping": "random_mapping", **rmu, **unlearn,
                **{f"tar_{f}": f"tar_{f}" for f in self.cfg.tar.run}}

    def cached_stage(self, name: str) -> Optional[dict]:
        """The metadata of stage ``name`` when ``out/name`` holds a finished run of its current key."""
        folder = self.out / name
        meta = read_json(folder / "stage.json")
        if meta is not None and meta.get("hash") == self.keys()[name][1] and (folder / "model" / "config.json").is_file():
            return meta
        return None

    def stale_reason(self, name: str) -> Optional[str]:
        """Why ``out/name`` (a training stage) or ``out/redteam/<defense>`` (``name = "redteam_<defense>"``) holds a
        run that cannot be reused, when the reason is the code that ran it: a line to show, or ``None`` (no run,
        a reusable one, or one of another configuration or parent)."""
        if name.startswith("redteam_"):
            meta = read_json(self.out / "redteam" / name[len("redteam_"):] / "demo_stage.json")
            key, h = self._redteam_key(name[len("redteam_"):])
        else:
            meta = read_json(self.out / name / "stage.json")
            key, h = self.keys()[name]
        if meta is None or meta.get("hash") == h:
            return None
        old = meta.get("key") if isinstance(meta.get("key"), Mapping) else {}
        again = "running it again" if name.startswith("redteam_") else "retraining"
        if old.get("version") != key["version"]:
            return (f"stage {name}: tar_lightning version changed since the cached run "
                    f"({old.get('version') or 'unknown'} -> {key['version']}); {again}")
        if old.get("code") != key["code"]:
            return f"stage {name}: code changed since the cached run; {again}"
        return None

    def load_stage(self, name: str) -> tuple[Any, Any]:
        """The model and tokenizer a finished stage exported to ``out/name/model``."""
        with quiet_hf_progress():
            model, tok = load_model(str(self.out / name / "model"), dtype="float32")
        model.train()
        meta = read_json(self.out / name / "stage.json") or {}
        if meta.get("evaluator") == self.evaluator.fingerprint and isinstance(meta.get("metrics"), Mapping):
            with contextlib.suppress(ConfigError):  # a stage written before a metric existed is scored again
                self.evaluator.remember(model, tok, meta["metrics"])
        return model, tok

    def stage(self, name: str, train) -> tuple[Any, Any, str]:
        """Runs ``train() -> (model, tokenizer)`` unless ``out/name`` holds a finished run of the same key."""
        key, h = self.keys()[name]
        folder = self.out / name
        meta = self.cached_stage(name)
        if meta is not None:
            model, tok = self.load_stage(name)
            self.result.stages[name] = {**meta, "cached": True}
            self.result.cached.append(name)
            log.info("demo: stage %s is cached in %s", name, folder)
            return model, tok, h
        reason = self.stale_reason(name)
        if reason is not None:
            self.say(f"[demo] {reason}")
        (folder / "stage.json").unlink(missing_ok=True)
        start = time.perf_counter()
        model, tok = train()
        wall = time.perf_counter() - start
        with torch.no_grad():
            metrics = self.evaluator(model, tok)
        model.train()
        with quiet_hf_progress():
            export_pretrained(model, tok, folder / "model", overwrite=True)
        meta = {"hash": h, "key": key, "metrics": metrics, "evaluator": self.evaluator.fingerprint, "wall_time_s": wall}
        write_json(folder / "stage.json", meta)
        self.result.stages[name] = {**meta, "cached": False}
        self.result.ran.append(name)
        self.say(f"[demo] {name}: {format_metrics(metrics)} ({wall:.0f} s)")
        return model, tok, h

    # -- stages ------------------------------------------------------------------------------------------
    def stage0(self):
        cfg, s = self.cfg, self.cfg.stage0

        def train():
            model, tok = self.fresh_model()
            L.seed_everything(cfg.seed, verbose=False)
            module = SFTModule(  # the mean of the two streams' CEs
                model, optimizer=adamw(s.lr, s.weight_decay), tokenizer=tok, streams={"forget": 0.5, "retain": 0.5},
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(s.steps, s.warmup_steps)),
            )
            data = TARDataModule(
                streams={"forget": knowledge_source("forget_all", cfg.world), "retain": knowledge_source("retain", cfg.world)},
                seq_len=cfg.seq_len, batch_size=s.batch_size, seed=cfg.seed, tokenizer=tok,
            )
            self.say(f"[demo] stage 0: teaching both domains ({s.steps} steps)")
            _trainer(s.steps, self.out / "stage0", self.train_callbacks("stage0", s.steps)).fit(
                module, data
            )
            return module.model, tok

        return self.stage("stage0", train)

    def stage1_data(self, tok, batch_size: int) -> TARDataModule:
        """The data of every stage-1 defense: ``forget_all`` as ``forget`` and ``retain``, in one order (data seed
        ``seed + 1``)."""
        cfg = self.cfg
        return TARDataModule(
            streams={"forget": knowledge_source("forget_all", cfg.world), "retain": knowledge_source("retain", cfg.world)},
            seq_len=cfg.seq_len, batch_size=batch_size, seed=cfg.seed + 1, tokenizer=tok,
        )

    def stage_rm(self, base, tok):
        cfg, s = self.cfg, self.cfg.random_mapping

        def train():
            L.seed_everything(cfg.seed, verbose=False)
            module = RandomMappingModule(
                copy.deepcopy(base), optimizer=lambda p: torch.optim.AdamW(p, lr=s.lr), tokenizer=tok,
                table_seed=s.table_seed,
            )
            data = self.stage1_data(tok, s.batch_size)
            self.say(f"[demo] stage 1: random mapping ({s.steps} steps)")
            callbacks = self.train_callbacks("random_mapping", s.steps)
            _trainer(s.steps, self.out / "random_mapping", callbacks).fit(module, data)
            return module.model, tok

        return self.stage("random_mapping", train)

    def stage_rmu(self, base, tok):
        """RMU (``rmu.enabled``) from the stage-0 model ``base``: the streams random mapping trains on
        (``forget_all`` steered, ``retain`` held), in the same order (data seed ``seed + 1``).

        Raises:
            ConfigError: an ``rmu`` value the model does not allow (a layer it does not have, an
                ``update_module`` its decoder layers lack), naming ``rmu.<key>``.
        """
        cfg, s = self.cfg, self.cfg.rmu

        def train():
            L.seed_everything(cfg.seed, verbose=False)
            try:
                module = RMUModule(
                    copy.deepcopy(base), optimizer=lambda p: torch.optim.AdamW(p, lr=s.lr), tokenizer=tok,
                    layer=s.layer, steering_coeff=s.steering_coeff, alpha=s.alpha, update_layers=s.update_layers,
                    update_module=s.update_module, seed=s.seed,
                )
            except ConfigError as err:  # RMUModule.<key>=...: the demo's key is rmu.<key>
                raise ConfigError(f"{str(err).replace('RMUModule.', 'rmu.')} (model {cfg.model})") from None
            data = self.stage1_data(tok, s.batch_size)
            self.say(f"[demo] stage 1: RMU at layer {s.layer} ({s.steps} steps)")
            _trainer(s.steps, self.out / "rmu", self.train_callbacks("rmu", s.steps)).fit(module, data)
            return module.model, tok

        return self.stage("rmu", train)

    def stage_unlearn(self, name: str, base, tok):
        """The Max-Entropy or Min-Posterior baseline (``name``: ``max_entropy`` or ``min_posterior``, with its
        section's ``enabled``) from the stage-0 model ``base``: the streams random mapping trains on (its forget loss
        on ``forget_all``, CE on ``retain``), in the same order (data seed ``seed + 1``)."""
        cfg, s = self.cfg, getattr(self.cfg, name)

        def train():
            L.seed_everything(cfg.seed, verbose=False)
            module = UnlearnModule(copy.deepcopy(base), optimizer=lambda p: torch.optim.AdamW(p, lr=s.lr),
                                   tokenizer=tok, **s.module_options())
            self.say(f"[demo] {stage_label(name)} ({s.steps} steps)")
            _trainer(s.steps, self.out / name, self.train_callbacks(name, s.steps)).fit(
                module, self.stage1_data(tok, s.batch_size))
            return module.model, tok

        return self.stage(name, train)

    def stage_tar(self, family: str, base, tok):
        cfg, s = self.cfg, self.cfg.tar

        def train():
            L.seed_everything(cfg.seed, verbose=False)
            tar_cfg = s.tar_config(family, seed=cfg.seed)
            module = TARModule(
                copy.deepcopy(base), tar_cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=s.lr), tokenizer=tok,
                reference_model=base,
            )
            streams = tar_streams(cfg.world, s.entropy_positions)
            needed = tar_cfg.stream_steps()
            data = TARDataModule(
                streams={k: v for k, v in streams.items() if k in needed},
                seq_len=cfg.seq_len, batch_size=s.batch_size, seed=cfg.seed + 2, tokenizer=tok,
            )
            self.say(f"[demo] stage 2: TAR, {family} adversary family ({s.steps} outer steps, K={tar_cfg.inner_steps})")
            callbacks = self.train_callbacks(f"tar_{family}", s.steps)
            folder = self.out / f"tar_{family}"
            _trainer(s.steps, folder, callbacks, log_to=folder / "logs").fit(module, data)
            # the fight along the adversary's trajectory, as `tar-lightning report --run` draws it
            training_report(folder / "logs", folder / FIGHT, overwrite=True)
            return module.model, tok

        return self.stage(f"tar_{family}", train)

    # -- red team ------------------------------------------------------------------------------------------
    def suite(self):
        """The demo's red-team suite (built once)."""
        if self._suite is None:
            self._suite = build_suite(self.cfg)
        return self._suite

    def _redteam_key(self, defense: str) -> tuple[dict, str]:
        parent = self.keys()[self.defenses()[defense]][1]
        key = {"stage": 3, "parent": parent, "suite": self.suite().to_dict(), "evaluator": self.evaluator.fingerprint,
               **self._code_key("redteam")}
        return key, config_hash(key)

    def cached_redteam(self, defense: str) -> Optional[dict]:
        """The red team of ``defense`` when ``out/redteam/defense`` holds a finished one of its current key."""
        meta = read_json(self.out / "redteam" / defense / "demo_stage.json")
        if meta is not None and meta.get("hash") == self._redteam_key(defense)[1]:
            return meta
        return None

    def discard_stale_redteam(self, defense: str) -> None:
        """Before a red team that is not cached runs: when ``out/redteam/defense`` holds one run by other code (or
        another library version), says so and deletes its run files, which the red team would otherwise reuse (they
        are keyed by attack configuration and model, and the model may not have changed)."""
        reason = self.stale_reason(f"redteam_{defense}")
        if reason is None:
            return
        self.say(f"[demo] {reason}")
        folder = self.out / "redteam" / defense
        for path in sorted((folder / "runs").glob("*.json")) if (folder / "runs").is_dir() else []:
            path.unlink(missing_ok=True)
        (folder / "demo_stage.json").unlink(missing_ok=True)

    def redteam(self, defense: str, model, tok, compute_s: Optional[float] = None) -> dict:
        """Stage 3 for one defense: every attack × seed (finished run files in its folder are reused).

        ``compute_s``: the runs were computed elsewhere (worker processes) in this many seconds; this call only
        collects them."""
        suite = self.suite()
        folder = self.out / "redteam" / defense
        h = self._redteam_key(defense)[1]
        name = f"redteam_{defense}"
        meta = self.cached_redteam(defense)
        if meta is not None:
            self.result.stages[name] = {"hash": h, "wall_time_s": meta["wall_time_s"], "cached": True}
            self.result.cached.append(name)
            return meta
        if compute_s is None:
            self.discard_stale_redteam(defense)
            self.say(f"[demo] stage 3: red team on {defense} ({len(suite.attacks)} attacks x {len(suite.seeds)} seeds)")
        start = time.perf_counter()
        res = run_redteam(
            model, suite, out_dir=folder, tokenizer=tok, evaluator=self.evaluator, device="cpu",
            progress=self.cfg.progress and compute_s is None,
            overwrite=True,  # the demo keys its folders itself: a changed defense replaces its old red team
        )
        wall = time.perf_counter() - start if compute_s is None else compute_s
        meta = {
            "hash": h,
            "key": self._redteam_key(defense)[0],
            "wall_time_s": wall,
            "aggregate": res.aggregate,
            "attacks": {a.id: a.comment for a in res.suite.attacks},
            "runs": [
                {k: run.get(k) for k in ("attack", "seed", "before", "after", "trajectory", "lr", "steps", "config")}
                for run in res.runs
            ],
            "files": {k: str(v) for k, v in res.files.items()},
        }
        write_json(folder / "demo_stage.json", meta)
        self.result.stages[name] = {"hash": h, "wall_time_s": wall, "cached": False}
        self.result.ran.append(name)
        return meta

    def run_in_process(self) -> tuple[dict, dict]:
        """Runs (or loads) every stage in this process; returns ``(defense -> (model, tokenizer), defense ->
        red-team metadata)``."""
        m0, tok, _ = self.stage0()
        rm, tok, _ = self.stage_rm(m0, tok)
        defenses = {"no_defense": (m0, tok), "random_mapping": (rm, tok)}
        if self.cfg.rmu.enabled:
            rmu, _, _ = self.stage_rmu(m0, tok)
            defenses["rmu"] = (rmu, tok)
        for u in self.cfg.unlearn_stages():
            model, _, _ = self.stage_unlearn(u.forget_loss, m0, tok)
            defenses[u.forget_loss] = (model, tok)
        for family in self.cfg.tar.run:
            m, _, _ = self.stage_tar(family, rm, tok)
            defenses[f"tar_{family}"] = (m, tok)
        reds = {}
        for defense, (model, _) in defenses.items():
            model.eval()
            reds[defense] = self.redteam(defense, model, tok)
        return defenses, reds

    def collect(self, reds: Mapping, model_of: Callable[[str], tuple[Any, Any]]) -> None:
        """Fills cells and summary from the red-team metadata; ``model_of(defense) -> (model, tokenizer)``.
        Defenses come in report order (:meth:`defenses`) whatever order ``reds`` has (worker processes finish
        in any order), so ``results.json`` lists them alike for every run."""
        stage_of = self.defenses()
        suite_of = {a: suite for suite, ids in self.cfg.redteam.attacks.items() for a in ids}
        for defense in [d for d in stage_of if d in reds] + [d for d in reds if d not in stage_of]:
            meta = reds[defense]
            agg = meta["aggregate"]
            cells = {}
            for attack, s in agg["attacks"].items():
                runs = [r for r in meta["runs"] if r["attack"] == attack]
                cells[attack] = {
                    "suite": suite_of.get(attack),
                    "comment": meta["attacks"].get(attack, ""),
                    "safety_before": s["safety_before"],
                    "safety_after": s["safety_after"],
                    "safety_after_std": s["safety_after_std"],
                    "capability_before": s["capability_before"],
                    "capability_after": s["capability_after"],
                    "capability_kept": s["capability_kept"],
                    "broke": s["broke"],
                    "auc": s["auc"],
                    "curve": s["curve"],
                    "forget_A_after": mean_or_none([r["after"].get("forget_A_acc") for r in runs]),
                    "forget_loss_after": mean_or_none([r["after"].get("forget_loss") for r in runs]),
                    "steps": runs[0]["steps"] if runs else None,
                    "lr": runs[0]["lr"] if runs else None,
                    "seeds": s["seeds"],
                }
            self.result.cells[defense] = cells
            stage = self.result.stages.get(stage_of.get(defense, defense), {})
            before = stage.get("metrics", {})
            if stage and "retain_loss" not in before:  # a stage cached by a version without this metric
                model, tok = model_of(defense)
                with torch.no_grad():
                    before.update(self.evaluator(model, tok, only=["retain_loss"]))
            self.result.summary[defense] = {
                "before": before.get(SAFETY),
                "before_A": before.get("forget_A_acc"),
                "before_retain": before.get(CAPABILITY),
                "before_forget_loss": before.get("forget_loss"),
                "before_retain_loss": before.get("retain_loss"),
                "mean": agg["suite_mean"],
                "worst": agg["worst_case"],
                "bounded_worst": agg["bounded_worst_case"],
                "retain_after_mean": mean_or_none([c["capability_after"] for c in cells.values()]),
                "broken": agg["broken"],
            }
