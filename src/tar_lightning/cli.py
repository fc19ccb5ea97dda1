"""The ``tar-lightning`` command: ``fit | validate`` through LightningCLI, plus ``demo``, ``redteam``, ``evaluate``,
``export`` and ``report`` (:mod:`tar_lightning.command`); ``tar-lightning --help`` lists them all, ``--version`` prints
the library's version."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ActionYesNo, Namespace
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from tar_lightning import __version__
from tar_lightning.base_module import checkpoint_hyperparameters
from tar_lightning.callbacks.slurm import close_process_group
from tar_lightning.checkpoint import AtomicCheckpointIO
from tar_lightning.command import Command, parse_command
from tar_lightning.data import TARDataModule
from tar_lightning.demo.cli import demo_main
from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.evaluation.evaluate_cli import evaluate_main
from tar_lightning.evaluation.redteam_cli import redteam_main
from tar_lightning.export import RunRecordCallback, export_checkpoint
from tar_lightning.report_cli import report_main

__all__ = [
    "MergingConfigFile", "RichStepProgressBar", "RunFolderGuard", "TARArgumentParser", "TARCLI",
    "TQDMStepProgressBar", "check_logger_packages", "main", "merge_mappings", "previous_run_files",
    "step_progress_bar",
]

#: the subcommands run by LightningCLI (Lightning's ``test`` and ``predict`` need loops our modules do not have)
LIGHTNING_SUBCOMMANDS = ("fit", "validate")
#: every subcommand (LightningCLI's, then those with their own parsers, dispatched by :func:`main`) and its line in
#: ``tar-lightning --help``
SUBCOMMAND_HELP = {
    "fit": "train a recipe: --config recipe.yaml [--config overlay.yaml ...] [--dotted.key value ...]",
    "validate": "held-out loss/entropy on data.val_streams (and validation callbacks) of a recipe or --ckpt_path",
    "demo": "the end-to-end demo: teach a tiny model two domains, safeguard one, red-team it, write a report",
    "redteam": "attack a model with every attack of a red-team suite and report the results",
    "evaluate": "multiple-choice accuracy (WMDP / MMLU, lm-eval zero-shot format) of a model",
    "export": "write a training checkpoint as a Hugging Face folder (weights, config, tokenizer)",
    "report": "plot a TAR run's logs (adversary loss per inner step across outer steps, TR loss, retain loss)",
}
#: Lightning subcommands that are not offered, and what to use instead
NOT_OFFERED = {
    "test": "the modules have no test loop: use 'tar-lightning validate' (held-out loss and entropy on "
            "data.val_streams; MCQ accuracy with --config callbacks/mcq_validation.yaml), 'tar-lightning evaluate' "
            "(WMDP / MMLU accuracy of an exported model) or 'tar-lightning redteam'",
    "predict": "the modules have no predict loop: export the checkpoint ('tar-lightning export') and load it with "
               "transformers",
}


class RunFolderGuard:
    """The ``--overwrite`` option of ``fit|validate`` and the check behind it (a mix-in of :class:`TARCLI`).

    A run started into a folder that already holds a previous run (``*.ckpt`` entries in a ``ModelCheckpoint``'s
    folder, or the ``config.yaml`` this run would write) is refused before anything is written, with one line
    naming the two ways on: ``--ckpt_path last`` (resume that run) and ``--overwrite`` (start a new run there:
    the previous run's checkpoints are deleted and its config.yaml replaced). Any ``--ckpt_path`` counts as
    resuming; it cannot be combined with ``--overwrite``. Checkpoint folders are the ``ModelCheckpoint``
    ``dirpath`` values and, without a logger, ``<default_root_dir>/checkpoints`` (a logger's versioned folder is
    new for every run).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--overwrite", action=ActionYesNo, default=False,
            help="start a new run in a folder that holds a previous run: delete its checkpoints and replace its "
                 "config.yaml (without it such a run is refused; resume it with --ckpt_path last instead)",
        )
        super().add_arguments_to_parser(parser)

    def before_fit(self) -> None:
        self._guard_run_folder(checkpoints=True)

    def before_validate(self) -> None:
        self._guard_run_folder(checkpoints=False)

    def _guard_run_folder(self, checkpoints: bool) -> None:
        config = self.config[self.subcommand]
        overwrite, ckpt_path = bool(config.get("overwrite")), config.get("ckpt_path")
        if overwrite and ckpt_path:
            raise ConfigError(f"--overwrite with --ckpt_path {ckpt_path}: choose one (--ckpt_path resumes a run, "
                              "--overwrite starts a new one)")
        if ckpt_path:
            return
        previous = previous_run_files(self.trainer, checkpoints=checkpoints)
        if not previous:
            return
        if not overwrite:
            shown = ", ".join(str(p) for p in previous[:3]) + (f" (+{len(previous) - 3} more)" if len(previous) > 3 else "")
            raise ConfigError(f"the run folder holds a previous run ({shown}): resume it with --ckpt_path last, "
                              "or pass --overwrite to start a new run there (its checkpoints are deleted), or "
                              "choose another --trainer.default_root_dir")
        if self.trainer.is_global_zero:
            for path in previous:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.suffix == ".ckpt":
                    path.unlink(missing_ok=True)
            # config.yaml is replaced by Lightning's SaveConfigCallback when the run starts

            rank_zero_info(f"--overwrite: deleted {sum(p.suffix == '.ckpt' for p in previous)} checkpoint(s) of "
                           "the previous run in this folder")


def previous_run_files(trainer, checkpoints: bool = True) -> list[Path]:
    """What of a previous run lies where ``trainer`` would write: the ``*.ckpt`` entries (files, sharded folders,
    links) of its checkpoint folders (with ``checkpoints``) and the ``config.yaml`` LightningCLI would write."""

    found: list[Path] = []
    if checkpoints:
        folders = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.dirpath is not None:
                    folders.append(Path(cb.dirpath))
                elif not trainer.loggers:
                    folders.append(Path(trainer.default_root_dir) / "checkpoints")
        for folder in dict.fromkeys(folders):
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith("."))
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback) and cb.save_to_log_dir and trainer.log_dir is not None:
            config = Path(os.path.join(trainer.log_dir, cb.config_filename))
            if config.is_file():
                found.append(config)
    return found


# ------------------------------------------------------------------------------------------ --config merging
class MergingConfigFile(ActionConfigFile):
    """``--config FILE`` whose mappings merge into what earlier config files set, as dotted overrides do.

    jsonargparse merges nested options key by key, but a value typed as a mapping (``data.init_args.streams``,
    ``model.init_args.config``, a ``filter``) is one value to it: an overlay that sets only
    ``streams.forget.path`` would replace the whole ``streams`` mapping. Here such a mapping is the union of
    the earlier one and the overlay's, recursively (the overlay's values win; lists are replaced, and
    ``callbacks+`` appends). Mappings are merged from the second config file on, so a recipe never inherits a
    class's default mapping, and not across a ``class_path`` change (the other class's arguments are dropped).
    """

    @staticmethod
    def apply_config(parser, cfg, dest, value) -> None:
        applied = cfg.get(dest)
        earlier = cfg.clone() if isinstance(applied, list) and applied else None
        ActionConfigFile.apply_config(parser, cfg, dest, value)
        if earlier is not None:
            merge_mappings(earlier, cfg)


def merge_mappings(earlier: Namespace, merged: Namespace) -> None:
    """In ``merged`` (``earlier`` updated by one config file), each mapping the file replaced becomes the deep
    union of the earlier mapping and the file's (the file's values win), in place."""
    for key, value in list(merged.items()):
        if not isinstance(value, Mapping) or key not in earlier:
            continue
        before = earlier[key]
        if isinstance(before, Mapping) and before is not value and not _class_changed_above(earlier, merged, key):
            merged[key] = _deep_union(before, value)


def _deep_union(earlier: Any, later: Any) -> Any:
    if isinstance(earlier, Mapping) and isinstance(later, Mapping):
        union = dict(earlier)  # earlier keys keep their order (stream order is dataloader order), new ones follow
        for k, v in later.items():
            union[k] = _deep_union(earlier[k], v) if k in earlier else v
        return union
    if isinstance(earlier, Namespace) and isinstance(later, Namespace):
        if earlier.get("class_path") != later.get("class_path"):
            return later
        union = later.clone()  # jsonargparse already merged its plain values with the earlier ones
        for k, v in later.items():
            if isinstance(v, Mapping) and k in earlier and isinstance(earlier[k], Mapping):
                union[k] = _deep_union(earlier[k], v)
        return union
    return later


def _class_changed_above(earlier: Namespace, merged: Namespace, key: str) -> bool:
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == "init_args" and i:
            class_key = ".".join(parts[:i]) + ".class_path"
            if earlier.get(class_key) != merged.get(class_key):
                return True
    return False


class TARArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with :class:`MergingConfigFile` as its ``--config`` action."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action") is ActionConfigFile:
            kwargs["action"] = MergingConfigFile
        return super().add_argument(*args, **kwargs)


# ------------------------------------------------------------------------------------------ optional loggers
def _logger_requirements() -> list[tuple[type, tuple[str, ...], str]]:
    """(logger class, modules of which one must import, the extra that installs it)."""

    return [(TensorBoardLogger, ("tensorboard", "tensorboardX"), "tensorboard"), (WandbLogger, ("wandb",), "wandb")]


def check_logger_packages(logger: Any) -> None:
    """Raises :class:`ConfigError` (one line, naming the extra to install) when a configured ``trainer.logger``
    needs a package that does not import. ``logger`` is the parsed value: a class spec, a list of them, a bool
    or None."""
    specs = logger if isinstance(logger, (list, tuple)) else [logger]
    for spec in specs:
        class_path = spec.get("class_path") if isinstance(spec, (Namespace, Mapping)) else None
        if not isinstance(class_path, str):
            continue
        module_name, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        for base, modules, extra in _logger_requirements():
            if isinstance(cls, type) and issubclass(cls, base) and not any(_imports(m) for m in modules):
                raise ConfigError(
                    f"trainer.logger {class_path} needs the {modules[0]} package, which is not installed: "
                    f"pip install 'tar_lightning[{extra}]'"
                )


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ progress bar
class _StepTotals:
    """Progress-bar mix-in: a run bounded by ``max_steps`` alone (``max_epochs`` -1, which Lightning sets when only
    ``max_steps`` is given) shows ``Steps global_step/max_steps``, not ``Epoch 0/-2`` with per-epoch batch counts
    that disagree with the optimizer steps (gradient accumulation, resumed runs, data epochs shorter than the
    run)."""

    def _counts_steps(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self):
        if self._counts_steps():
            return self.trainer.max_steps
        return super().total_train_batches


class RichStepProgressBar(_StepTotals, RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps in step-bounded runs (see :class:`_StepTotals`)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Steps':{max(len('Steps'), len(self.validation_description))}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._counts_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)


class TQDMStepProgressBar(_StepTotals, TQDMProgressBar):
    """Lightning's tqdm progress bar, counting optimizer steps in step-bounded runs (see :class:`_StepTotals`)."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._counts_steps():
            self.train_progress_bar.set_description("Steps")
            self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._counts_steps():
            self._show_step(trainer)

    def _show_step(self, trainer) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.refresh()


def step_progress_bar():
    """The progress bar ``tar-lightning`` adds: rich where the ``rich`` package is installed (as Lightning
    chooses), tqdm otherwise."""
    try:
        return RichStepProgressBar()
    except ModuleNotFoundError:
        return TQDMStepProgressBar()


class TARCLI(RunFolderGuard, LightningCLI):
    """LightningCLI in subclass mode with OmegaConf interpolation (``${data.init_args.seq_len}``) in recipes,
    resolved after every --config file and command-line override is merged (parser mode ``omegaconf+``).

    The model is any LightningModule (``class_path: tar_lightning.TARModule`` ...) and the data any
    LightningDataModule; the optimizer is the module's own ``optimizer`` argument, so the CLI adds none.
    Mappings in later ``--config`` files merge into earlier ones (:class:`MergingConfigFile`). A logger whose
    package is missing is a one-line error naming the extra to install, before anything is built; ``validate``
    without validation data is an error, not a silent no-op; the progress bar counts optimizer steps in runs
    bounded by ``max_steps`` (:func:`step_progress_bar`, unless the recipe configures a progress bar).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", TARArgumentParser)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # config.yaml as LightningCLI writes it, and in every checkpoint the command line, --config files and resolved
        # config, which `tar-lightning export` puts on the model card

        kwargs.setdefault("save_config_callback", RunRecordCallback)
        if kwargs["save_config_callback"] is RunRecordCallback:
            launch = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
            kwargs["save_config_kwargs"] = {
                "launch_args": list(launch) if isinstance(launch, (list, tuple)) else None,
                **(kwargs["save_config_kwargs"] or {}),
            }
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("prog", "tar-lightning")  # not "cli.py" under python -m tar_lightning.cli
        # Recipe errors (unknown keys, wrong types) are raised, and main() prints them as one line (exit code 2).
        parser_kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (``test`` and ``predict`` are refused by :func:`main`: no such loops)."""
        lightning = LightningCLI.subcommands()
        return {name: lightning[name] for name in LIGHTNING_SUBCOMMANDS}

    def instantiate_classes(self) -> None:
        """Checks what can be checked on the parsed config before any model or data is built, then builds."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_logger_packages(config.get("trainer.logger"))
        if self.subcommand == "validate":
            _check_validation_data(config.get("data"))
        super().instantiate_classes()

    def after_validate(self) -> None:
        if not sum(self.trainer.num_val_batches):
            raise ConfigError("validate ran no validation batch: the data module gave no validation data (for "
                              "TARDataModule: add streams under data.init_args.val_streams; trainer.limit_val_batches "
                              "must not be 0)")

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with :class:`~tar_lightning.checkpoint.AtomicCheckpointIO` added unless the recipe
        configures a ``CheckpointIO`` plugin itself (checkpoints are written atomically, never with NaN weights),
        and the step-counting progress bar (:func:`step_progress_bar`) unless the recipe configures one or turns
        the bar off."""

        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = kwargs.get("plugins", trainer_config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        bar_enabled = kwargs.get("enable_progress_bar", trainer_config.get("enable_progress_bar"))
        if bar_enabled is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, step_progress_bar()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path PATH``: the module is rebuilt with the arguments recorded in the checkpoint (what
        LightningCLI does for files), here also for sharded FSDP2 checkpoint folders (read from their ``meta.pt``,
        not their shards) and for checkpoints of modules built in Python (their plain recorded arguments, applied
        to the recipe's class), read safely (``weights_only``; a bad file is our one-line error)."""

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).exists():  # "last", "best", ...: resolved by the Trainer
            return
        hparams = checkpoint_hyperparameters(ckpt_path)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        else:  # written outside the CLI: plain arguments of the recipe's class, None where nothing was recorded
            class_path = self.config[subcommand].get("model.class_path")
            recorded = {k: v for k, v in hparams.items() if v is not None}
            if class_path is None or not recorded:
                return
            hparams = {"class_path": class_path, "dict_kwargs": recorded}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)


def _check_validation_data(data: Any) -> None:
    """``validate`` of a :class:`~tar_lightning.TARDataModule` without ``val_streams`` would validate nothing."""

    class_path = data.get("class_path") if isinstance(data, Namespace) else None
    if not isinstance(class_path, str):
        return
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    if isinstance(cls, type) and issubclass(cls, TARDataModule) and not data.get("init_args.val_streams"):
        raise ConfigError(f"validate: data.init_args.val_streams of {class_path} is empty, so there is nothing "
                          "to validate: add held-out streams there (callbacks/mcq_validation.yaml adds one)")


@dataclass
class ExportOptions:
    """Options of ``tar-lightning export``."""

    ckpt: str = field(metadata={"help": "the .ckpt file (or sharded FSDP2 checkpoint folder) written by "
                                        "tar-lightning fit"})
    out: str = field(metadata={"help": "the folder to write (atomically)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing folder"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "take the tokenizer from this source instead"})
    dtype: Optional[str] = field(default=None, metadata={"help": "cast weights (float32, bfloat16, float16)"})
    redteam: Optional[str] = field(default=None, metadata={
        "help": "put the summary of this red team of the model (tar-lightning redteam --out FOLDER) on the model card"})


EXPORT = Command(
    name="export",
    description="Write a training checkpoint as a Hugging Face folder (weights, config, tokenizer) with a model card.",
    options=ExportOptions,
)


def _export_main(argv: Sequence[str]) -> int:
    try:
        parsed = parse_command(EXPORT, argv)
    except ConfigError as err:
        print(f"tar-lightning export: error: {err}", file=sys.stderr)
        return 2
    if parsed.exit_code is not None:
        return parsed.exit_code
    args = parsed.options
    try:
        out = export_checkpoint(
            args.ckpt, args.out, overwrite=args.overwrite, tokenizer_source=args.tokenizer, dtype=args.dtype,
            redteam=args.redteam,
        )
    except TARLightningError as err:
        print(f"tar-lightning export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} -> {out}")
    return 0


def top_level_help() -> str:
    """What ``tar-lightning --help`` prints: every subcommand with its line, and where each one's options are."""

    width = max(map(len, SUBCOMMAND_HELP))
    lines = [
        "usage: tar-lightning {" + ",".join(SUBCOMMAND_HELP) + "} ...",
        "       tar-lightning --version",
        "",
        f"Tamper-resistant safeguards (TAR) for open-weight LLMs, and a red team to test them (tar_lightning {__version__}).",
        "",
        "subcommands (tar-lightning SUBCOMMAND --help for its options):",
        *(f"  {name:{width}}  {text}" for name, text in SUBCOMMAND_HELP.items()),
        "",
        "not offered: " + "; ".join(f"{name} ({text.split(':')[0]})" for name, text in NOT_OFFERED.items()),
        "",
        "options:",
        "  -h, --help     show this message and exit",
        "  -V, --version  print the library version and exit",
    ]
    return "\n".join(lines)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A deprecated flag's ``FutureWarning`` as one line on the console (other warnings as Python shows them)."""
    if issubclass(category, FutureWarning) and str(message).startswith("tar-lightning "):
        print(f"tar-lightning: warning: {str(message).removeprefix('tar-lightning ')}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tar-lightning`` console script."""
    from_command_line = argv is None
    if from_command_line:
        warnings.showwarning = _show_warning
        # bitsandbytes (imported by peft/transformers when installed) logs a missing optional CPU kernel package
        # at import on every CPU run; it changes nothing we do
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"tar-lightning {__version__}")
        return 0
    if argv[0] in NOT_OFFERED:
        print(f"tar-lightning: error: {argv[0]!r} is not offered: {NOT_OFFERED[argv[0]]}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "export":
            return _export_main(argv[1:])
        if argv[0] == "demo":
            return demo_main(argv[1:])
        if argv[0] == "evaluate":
            return evaluate_main(argv[1:])
        if argv[0] == "redteam":
            return redteam_main(argv[1:])
        if argv[0] == "report":
            return report_main(argv[1:])
        if argv[0] not in LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
            print(f"tar-lightning: unknown command {argv[0]!r}; expected one of {', '.join(SUBCOMMAND_HELP)} "
                  "(tar-lightning --help)", file=sys.stderr)
            return 2
        try:
            TARCLI(args=None if from_command_line else argv)
        finally:
            # gloo left to the interpreter's shutdown often aborts a rank at exit (rc 134), failing a Slurm job
            close_process_group()
        return 0
    except argparse.ArgumentError as e:
        # Argument-parsing errors exit (as argparse/jsonargparse always did), but with one line, no usage dump.
        print(f"tar-lightning: error: {condense_parse_error(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except (TARLightningError, ValueError) as e:
        ours = _our_error(e)
        if ours is None:
            raise
        print(f"tar-lightning: error: {ours}", file=sys.stderr)
        return 2


_STRUCTURAL = ("Does not validate against", "Subtypes:", "Errors:", "- Problem with given class_path",
               "- Expected a <class 'NoneType'>", "Given value type:", "Given value:")


def condense_parse_error(message: str) -> str:
    """One line out of jsonargparse's nested recipe error: the key path, the class, and the innermost reason."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "invalid arguments"
    keys: list[str] = []
    where = None
    for line in lines:
        if line.startswith('Parser key "'):
            keys.append(line.split('"')[1])
            continue
        if line.startswith("- Problem with given class_path"):
            where = line.split("'")[1] if "'" in line else where
            continue
        if line.startswith(_STRUCTURAL):
            continue
        reason = line.lstrip("- ")
        prefix = f"recipe key {'.'.join(keys)!r}" if keys else "recipe"
        return f"{prefix}{f' ({where})' if where else ''}: {reason}"
    return lines[0]


def _our_error(exc: BaseException) -> Optional[TARLightningError]:
    """Our own error behind ``exc``: jsonargparse wraps errors raised while instantiating a class."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TARLightningError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
