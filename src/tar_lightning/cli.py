"""The ``tar-lightning`` command: ``fit | validate | test`` through LightningCLI, plus ``demo``, ``export``, ``evaluate`` and ``redteam``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from tar_lightning.errors import TARLightningError

__all__ = ["TARCLI", "main"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EXTRA_SUBCOMMANDS = ("demo", "export", "evaluate", "redteam")


class TARCLI(LightningCLI):
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
        TARCLI(args=None if from_command_line else argv)
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
