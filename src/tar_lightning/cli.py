"""The ``tar-lightning`` command: ``fit | validate | test`` through LightningCLI, plus ``demo``, ``export``, ``evaluate`` and ``redteam``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from tar_lightning.errors import TARLightningError

__all__ = ["RunFolderGuard", "TARCLI", "main", "previous_run_files"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EXTRA_SUBCOMMANDS = ("demo", "export", "evaluate", "redteam")


class RunFolderGuard:
    """The ``--overwrite`` option of ``fit|validate|test`` and the check behind it (a mix-in of :class:`TARCLI`).

    A run started into a folder that already holds a previous run (``*.ckpt`` entries in a ``ModelCheckpoint``'s
    folder, or the ``config.yaml`` this run would write) is refused before anything is written, with one line
    naming the two ways on: ``--ckpt_path last`` (resume that run) and ``--overwrite`` (start a new run there:
    the previous run's checkpoints are deleted and its config.yaml replaced). Any ``--ckpt_path`` counts as
    resuming; it cannot be combined with ``--overwrite``. Checkpoint folders are the ``ModelCheckpoint``
    ``dirpath`` values and, without a logger, ``<default_root_dir>/checkpoints`` (a logger's versioned folder is
    new for every run).
    """

    def add_arguments_to_parser(self, parser) -> None:
        from jsonargparse import ActionYesNo

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

    def before_test(self) -> None:
        self._guard_run_folder(checkpoints=False)

    def _guard_run_folder(self, checkpoints: bool) -> None:
        import shutil

        from tar_lightning.errors import ConfigError

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
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            rank_zero_info(f"--overwrite: deleted {sum(p.suffix == '.ckpt' for p in previous)} checkpoint(s) of "
                           "the previous run in this folder")


def previous_run_files(trainer, checkpoints: bool = True) -> list[Path]:
    """What of a previous run lies where ``trainer`` would write: the ``*.ckpt`` entries (files, sharded folders,
    links) of its checkpoint folders (with ``checkpoints``) and the ``config.yaml`` LightningCLI would write."""
    import os

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import SaveConfigCallback

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


class TARCLI(RunFolderGuard, LightningCLI):
    """LightningCLI in subclass mode with OmegaConf interpolation (``${data.init_args.seq_len}``) in recipes,
    resolved after every --config file and command-line override is merged (parser mode ``omegaconf+``).

    The model is any LightningModule (``class_path: tar_lightning.TARModule`` ...) and the data any
    LightningDataModule; the optimizer is the module's own ``optimizer`` argument, so the CLI adds none.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        # Recipe errors (unknown keys, wrong types) are raised, and main() prints them as one line (exit code 2).
        parser_kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with :class:`~tar_lightning.checkpoint.AtomicCheckpointIO` added unless the recipe
        configures a ``CheckpointIO`` plugin itself (checkpoints are written atomically, never with NaN weights)."""
        from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

        from tar_lightning.checkpoint import AtomicCheckpointIO

        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = kwargs.get("plugins", trainer_config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path PATH``: the module is rebuilt with the arguments recorded in the checkpoint (what
        LightningCLI does for files), here also for sharded FSDP2 checkpoint folders (read from their ``meta.pt``,
        not their shards) and for checkpoints of modules built in Python (their plain recorded arguments, applied
        to the recipe's class), read safely (``weights_only``; a bad file is our one-line error)."""
        from tar_lightning.base_module import checkpoint_hyperparameters

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


def _export_main(argv: Sequence[str]) -> int:
    from tar_lightning.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="tar-lightning export",
        description="Write a training checkpoint as a Hugging Face folder (weights, config, tokenizer).",
    )
    parser.add_argument("--ckpt", required=True, help="the .ckpt file (or sharded FSDP2 checkpoint folder) written by tar-lightning fit")
    parser.add_argument("--out", required=True, help="the folder to write (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this source instead")
    parser.add_argument("--dtype", default=None, help="cast weights (float32, bfloat16, float16)")
    args = parser.parse_args(argv)
    out = export_checkpoint(
        args.ckpt, args.out, overwrite=args.overwrite, tokenizer_source=args.tokenizer, dtype=args.dtype
    )
    print(f"exported {args.ckpt} -> {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tar-lightning`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "export":
            return _export_main(argv[1:])
        if argv and argv[0] == "demo":
            from tar_lightning.demo_cli import demo_main

            return demo_main(argv[1:])
        if argv and argv[0] == "evaluate":
            from tar_lightning.evaluation.evaluate_cli import evaluate_main

            return evaluate_main(argv[1:])
        if argv and argv[0] == "redteam":
            from tar_lightning.evaluation.redteam_cli import redteam_main

            return redteam_main(argv[1:])
        if argv and argv[0] not in LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
            print(
                f"tar-lightning: unknown command {argv[0]!r}; expected one of "
                f"{', '.join(LIGHTNING_SUBCOMMANDS + EXTRA_SUBCOMMANDS)}",
                file=sys.stderr,
            )
            return 2
        try:
            TARCLI(args=None if from_command_line else argv)
        finally:
            # gloo left to the interpreter's shutdown often aborts a rank at exit (rc 134), failing a Slurm job
            from tar_lightning.callbacks.slurm import close_process_group

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
