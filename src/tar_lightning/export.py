"""Turning a training checkpoint into a Hugging Face folder (weights + config + tokenizer).

Both kinds of Lightning checkpoint are read: a ``.ckpt`` file (single device, DDP) and the sharded folder that
:class:`~tar_lightning.strategy.FSDP2Strategy` (or Lightning's ``ModelParallelStrategy``) writes under FSDP2 (one
``.distcp`` file per rank, ``.metadata`` and ``meta.pt``), which is consolidated here in one process, without a
process group: only the weights and the outer optimizer's state (needed to move schedule-free weights to their
evaluation point) are read. Nothing in either kind of checkpoint is unpickled beyond tensors and plain data.
The readers (:func:`read_checkpoint`, :func:`is_sharded_checkpoint`) and :func:`tokenizer_files` are those of
:mod:`tar_lightning.checkpoint` (the training modules use them too), re-exported here.

Every export carries a model card: ``README.md`` for people and ``tar_lightning.json`` with the same facts for
programs (:func:`model_card_facts`): the base model the policy was loaded from, the ``--config`` files and command
line the run was launched with and its resolved configuration (what LightningCLI writes to the run's
``config.yaml``), the library version that trained and that exported it, the checkpoint (path, global step) and,
when given, the summary of a red team of the exported model. ``tar-lightning fit`` records the run in every
checkpoint it writes (:class:`RunRecordCallback`); checkpoints written otherwise say so on the card.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import schedulefree
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from transformers import AutoTokenizer

import tar_lightning
from tar_lightning.checkpoint import (
    atomic_write_text,
    is_sharded_checkpoint,
    read_checkpoint,
    tokenizer_files,
)
from tar_lightning.errors import ConfigError, DataError, ModelLoadError
from tar_lightning.evaluation.progress import quiet_hf_progress
from tar_lightning.models import (
    export_pretrained,
    model_from_checkpoint_metadata,
    resolve_dtype,
    tiny_tokenizer,
)

__all__ = [
    "CARD_JSON",
    "RUN_RECORD_KEY",
    "RunRecordCallback",
    "checkpoint_to_model",
    "export_checkpoint",
    "is_sharded_checkpoint",
    "launch_config_files",
    "model_card_facts",
    "model_card_markdown",
    "read_checkpoint",
    "read_redteam_summary",
    "tokenizer_files",
    "write_model_card",
]

#: the checkpoint entry :class:`RunRecordCallback` writes (what made the run)
RUN_RECORD_KEY = "tar_lightning_run"
#: the machine-readable model card written next to ``README.md`` in an export
CARD_JSON = "tar_lightning.json"
#: the version of the layout of :data:`CARD_JSON`
CARD_FORMAT = 1


def _to_eval_point(model: torch.nn.Module, optimizer_state: dict[str, Any]) -> None:
    """Move schedule-free training-point weights y to the evaluation point x, as the optimizer's ``eval()``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = schedulefree.AdamWScheduleFree(params, lr=1.0)
    try:
        opt.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"the checkpoint's schedule-free optimizer state does not match the model: {e}") from e
    opt.eval()


def load_tokenizer(source: str):
    """The tokenizer of a model source (tiny aliases included), without loading the model's weights."""
    if source.startswith("tiny"):
        return tiny_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}: {e}") from e


def checkpoint_to_model(ckpt_path: str | Path, tokenizer_source: Optional[str] = None):
    """Rebuild ``(model, tokenizer)`` from a tar_lightning checkpoint, weights at their evaluation point.

    Args:
        ckpt_path: a ``.ckpt`` written by ``Trainer.fit`` with a tar_lightning module, or the sharded checkpoint
            folder written under FSDP2 (``ModelParallelStrategy``), consolidated here.
        tokenizer_source: load the tokenizer from here instead of the copy inside the checkpoint.

    Raises:
        ConfigError / ModelLoadError: missing, unreadable or foreign checkpoints.
    """
    path = Path(ckpt_path)
    return _model_from_checkpoint(read_checkpoint(path), path, tokenizer_source)


def _model_from_checkpoint(ckpt: Mapping[str, Any], path: Path, tokenizer_source: Optional[str]):
    """:func:`checkpoint_to_model` of a checkpoint already read (:func:`read_checkpoint`)."""
    meta = ckpt.get("tar_lightning")
    model, tokenizer = model_from_checkpoint_metadata(meta, str(path))
    prefix = meta.get("model_prefix", "model.")
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} does not match its own model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for opt_state in ckpt.get("optimizer_states", []):
        groups = opt_state.get("param_groups", [])
        if groups and all(g.get("train_mode") for g in groups):
            _to_eval_point(model, opt_state)
    if tokenizer_source is not None:
        tokenizer = load_tokenizer(tokenizer_source)
    elif tokenizer is None:
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no tokenizer; pass --tokenizer SOURCE")
    return model, tokenizer


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer_source: Optional[str] = None,
    dtype: Optional[str] = None,
    redteam: Optional[str | os.PathLike] = None,
) -> Path:
    """Write a checkpoint as an HF folder (model + tokenizer), atomically, with its model card (``README.md`` and
    :data:`CARD_JSON`, :func:`model_card_facts`); returns the folder.

    Args:
        ckpt_path: the ``.ckpt`` file or sharded checkpoint folder.
        out_dir: the folder to write.
        overwrite: replace an existing ``out_dir``.
        tokenizer_source: take the tokenizer from this source instead of the checkpoint's copy.
        dtype: cast the weights (``float32``, ``bfloat16``, ``float16``).
        redteam: a red-team output folder (``tar-lightning redteam --out``) whose summary goes on the card.

    Raises:
        ConfigError / ModelLoadError: a bad checkpoint, output folder or dtype. ConfigError / DataError: a
            ``redteam`` folder without readable results; checked before anything is written.
    """
    path = Path(os.path.expanduser(os.fspath(ckpt_path)))
    redteam_summary = read_redteam_summary(redteam) if redteam is not None else None
    ckpt = read_checkpoint(path)
    facts = model_card_facts(ckpt, path, redteam=redteam_summary, dtype=dtype, tokenizer_source=tokenizer_source)
    model, tokenizer = _model_from_checkpoint(ckpt, path, tokenizer_source)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    with quiet_hf_progress(unless_terminal=True):  # transformers' shard-writing bar: escape codes in a log file
        out = export_pretrained(model, tokenizer, out_dir, overwrite=overwrite)
    write_model_card(out, facts)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------ the run's record
def launch_config_files(args: Sequence[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` (also ``--config=VALUE``) in a command line, in order."""
    found: list[str] = []
    args = list(args)
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append(str(args[i + 1]))
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return found


def _config_file_record(value: str) -> dict[str, Any]:
    """A ``--config`` value as recorded: as given, and for a file its absolute path and SHA-256 at launch (an
    inline YAML string has neither)."""
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        return {"path": value, "absolute": None, "sha256": None}
    return {"path": value, "absolute": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


class RunRecordCallback(SaveConfigCallback):
    """LightningCLI's :class:`~lightning.pytorch.cli.SaveConfigCallback` (the run's ``config.yaml`` in the log
    folder) that also records in every checkpoint, under :data:`RUN_RECORD_KEY`, what made the run: the library
    version, the command line and its ``--config`` files (path, absolute path and SHA-256 at launch), where
    ``config.yaml`` was written and the resolved configuration itself (the same YAML), so that an export's model
    card does not depend on the run folder still being there. ``tar-lightning fit`` uses it.

    Args:
        launch_args: the command line after ``tar-lightning`` (``None``: not known, nothing recorded of it).
        *args, **kwargs: those of ``SaveConfigCallback``.
    """

    def __init__(self, *args: Any, launch_args: Optional[Sequence[str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.launch_args = None if launch_args is None else [str(a) for a in launch_args]
        self._record: Optional[dict[str, Any]] = None

    def run_record(self, log_dir: Optional[str]) -> dict[str, Any]:
        """The record, with ``config.yaml`` in ``log_dir`` (``None``: not written to a log folder)."""
        config_yaml = None
        if self.save_to_log_dir and log_dir is not None:
            config_yaml = str(Path(log_dir, self.config_filename).resolve())
        return {
            "library_version": tar_lightning.__version__,
            "launch_args": self.launch_args,
            "config_files": (None if self.launch_args is None
                             else [_config_file_record(v) for v in launch_config_files(self.launch_args)]),
            "config_yaml": config_yaml,
            "config": self.parser.dump(self.config, skip_none=False),
        }

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # built once per run (the configuration does not change while it runs), here where every rank takes part
        # in the broadcast behind trainer.log_dir
        if self._record is None:
            self._record = self.run_record(trainer.log_dir if self.save_to_log_dir else None)
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._record is None:  # not set up by a Trainer: no log folder to name
            self._record = self.run_record(None)
        checkpoint[RUN_RECORD_KEY] = self._record


# ------------------------------------------------------------------------------------------ the model card
def _checked_run_record(record: Any, where: str) -> Optional[dict[str, Any]]:
    """The checkpoint's run record, its types checked (``None`` when the checkpoint has none)."""
    if record is None:
        return None
    expected = {"library_version": str, "launch_args": list, "config_files": list, "config_yaml": str, "config": str}
    if not isinstance(record, Mapping):
        raise ModelLoadError(f"checkpoint {where!r}: {RUN_RECORD_KEY!r} is a {type(record).__name__}, expected a "
                             "mapping written by tar-lightning fit")
    for key, kind in expected.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            raise ModelLoadError(f"checkpoint {where!r}: {RUN_RECORD_KEY}.{key} is a {type(value).__name__}, "
                                 f"expected a {kind.__name__}")
    return dict(record)


def _base_model(ckpt: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The source the policy was loaded from, as the checkpoint records it: the module's ``model`` argument (a
    source string or the fields of a ``ModelSource``), else the ``_name_or_path`` transformers keeps in the
    model's config; ``None`` when neither names one (a model built in Python)."""
    hparams = ckpt.get("hyper_parameters") or {}
    model = hparams.get("model") if isinstance(hparams, Mapping) else None
    if isinstance(model, str) and model:
        return {"source": model, "recorded_in": "hyper_parameters.model"}
    if isinstance(model, Mapping) and isinstance(model.get("source"), str):
        return {**{k: v for k, v in model.items() if v not in (None, {}, [])},
                "recorded_in": "hyper_parameters.model"}
    meta = ckpt.get("tar_lightning")
    hf_config = meta.get("hf_config") if isinstance(meta, Mapping) else None
    name = hf_config.get("_name_or_path") if isinstance(hf_config, Mapping) else None
    if isinstance(name, str) and name:
        return {"source": name, "recorded_in": "tar_lightning.hf_config._name_or_path"}
    return None


def model_card_facts(
    ckpt: Mapping[str, Any],
    ckpt_path: str | os.PathLike,
    *,
    redteam: Optional[Mapping[str, Any]] = None,
    dtype: Optional[str] = None,
    tokenizer_source: Optional[str] = None,
) -> dict[str, Any]:
    """What an export's model card states (the content of :data:`CARD_JSON`).

    Args:
        ckpt: the checkpoint, as :func:`read_checkpoint` returns it.
        ckpt_path: where it was read from.
        redteam: :func:`read_redteam_summary` of a red team of the exported model, if any.
        dtype, tokenizer_source: the export's options.

    Returns:
        ``{"format", "library", "base_model", "module", "checkpoint", "run", "export", "redteam"}``; ``run`` and
        ``base_model`` are ``None`` when the checkpoint does not record them, ``run["config"]`` is the resolved
        configuration as a mapping (read with ``yaml.safe_load``).

    Raises:
        ModelLoadError: a run record of the wrong shape, or a resolved configuration that is not YAML.
    """
    path = Path(os.path.expanduser(os.fspath(ckpt_path)))
    record = _checked_run_record(ckpt.get(RUN_RECORD_KEY), str(path))
    run = None
    if record is not None:
        config = None
        if record.get("config") is not None:
            try:
                config = yaml.safe_load(record["config"])
            except yaml.YAMLError as e:
                raise ModelLoadError(f"checkpoint {str(path)!r}: {RUN_RECORD_KEY}.config is not YAML: {e}") from e
        run = {
            "trained_with_library_version": record.get("library_version"),
            "launch_args": record.get("launch_args"),
            "config_files": record.get("config_files"),
            "config_yaml": record.get("config_yaml"),
            "config": config,
        }
    hparams = ckpt.get("hyper_parameters")
    module = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    step, epoch = ckpt.get("global_step"), ckpt.get("epoch")
    return {
        "format": CARD_FORMAT,
        "library": {"name": "tar_lightning", "version": tar_lightning.__version__},
        "base_model": _base_model(ckpt),
        "module": module if isinstance(module, str) else None,
        "checkpoint": {
            "path": str(path.resolve()),
            "sharded": is_sharded_checkpoint(path),
            "global_step": step if isinstance(step, int) else None,
            "epoch": epoch if isinstance(epoch, int) else None,
        },
        "run": run,
        "export": {"dtype": dtype, "tokenizer": tokenizer_source or "the checkpoint's copy"},
        "redteam": dict(redteam) if redteam is not None else None,
    }


def _shown_path(path: Any) -> str:
    """A path as the README card shows it: relative paths as given, absolute ones by file name only (the card is
    meant to be published; ``tar_lightning.json`` keeps the full paths)."""
    text = str(path)
    return Path(text).name if Path(text).is_absolute() else text


def _need(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise DataError(f"{where}: missing {key!r} (not a results.json written by tar-lightning redteam)")
    return mapping[key]


def read_redteam_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """The summary of a finished red team (``tar-lightning redteam --out FOLDER``) for a model card, from its
    ``results.json`` (read as JSON data): suite, model, metrics, suite mean, worst and bounded worst case, the
    attacks that broke the safeguard, and each attack's mean safety and capability before and after.

    Raises:
        ConfigError: ``folder`` is not a folder, or holds no ``results.json`` (not a red-team output folder, or a
            red team that has not finished).
        DataError: a ``results.json`` that is not JSON or lacks the entries a red team writes.
    """
    out = Path(os.path.expanduser(os.fspath(folder)))
    if not out.is_dir():
        raise ConfigError(f"--redteam {str(out)!r}: no such folder (give the --out folder of tar-lightning redteam)")
    results = out / "results.json"
    if not results.is_file():
        runs = sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
        why = (f"{len(runs)} run file(s) in runs/ but no summary: the red team has not finished (rerun it with the "
               "same --out to complete it)") if runs else "not the --out folder of tar-lightning redteam"
        raise ConfigError(f"--redteam {str(out)!r}: no results.json ({why})")
    try:
        payload = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{str(results)!r} cannot be read as JSON: {e}") from e
    where = str(results)
    try:
        return _redteam_summary(payload, out, where)
    except (AttributeError, TypeError, ValueError) as e:  # a value of the wrong type somewhere in the file
        raise DataError(f"{where}: not a results.json written by tar-lightning redteam ({e})") from None


def _redteam_summary(payload: Any, out: Path, where: str) -> dict[str, Any]:
    summary, aggregate = _need(payload, "summary", where), _need(payload, "aggregate", where)
    suite = _need(summary, "suite", where)
    evaluation = _need(suite, "evaluation", where)
    attacks = {}
    for attack, values in (_need(aggregate, "attacks", where) or {}).items():
        attacks[attack] = {k: values.get(k) for k in ("seeds", "safety_before", "safety_after", "capability_before",
                                                       "capability_after", "capability_kept", "broke")}
    return {
        "folder": str(out.resolve()),
        "suite": _need(suite, "name", where),
        "model": summary.get("model"),
        "evaluator": summary.get("evaluator"),
        "safety": _need(evaluation, "safety", where),
        "capability": _need(evaluation, "capability", where),
        "capability_floor": evaluation.get("capability_floor"),
        "runs": len(payload.get("runs") or []),
        "suite_mean": _need(aggregate, "suite_mean", where),
        "worst_case": _need(aggregate, "worst_case", where),
        "bounded_worst_case": _need(aggregate, "bounded_worst_case", where),
        "broken": _need(aggregate, "broken", where),
        "attacks": attacks,
    }


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def card_title(facts: Mapping[str, Any], folder: str) -> str:
    """The model card's heading: ``"<folder>: TARModule of `<base model>`"`` with what the facts record."""
    module = str(facts["module"]).rsplit(".", 1)[-1] if facts.get("module") else None
    base = facts["base_model"]["source"] if facts.get("base_model") else None
    if module and base:
        return f"{folder}: {module} of `{base}`"
    if module or base:
        return f"{folder}: " + (module or f"from `{base}`")
    return folder


def model_card_markdown(facts: Mapping[str, Any], title: str = "model") -> str:
    """The ``README.md`` of an export: :func:`model_card_facts` for people (Hugging Face front matter first)."""
    lib, ckpt, run, base = facts["library"], facts["checkpoint"], facts["run"], facts["base_model"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- tar-lightning",
        "- tamper-resistance",
        "---",
        "",
        f"# {title}",
        "",
        f"Exported by tar_lightning {lib['version']} (`tar-lightning export`) from a training checkpoint. "
        f"The same facts, machine-readable: `{CARD_JSON}`.",
        "",
        "## Provenance",
        "",
        "- Base model: " + (f"`{base['source']}`" if base else
                            "not recorded (the policy was given to the module as a Python object)"),
        f"- Training module: `{facts['module']}`" if facts["module"] else "- Training module: not recorded",
        f"- Checkpoint: `{Path(ckpt['path']).name}`" + (" (sharded)" if ckpt["sharded"] else "")
        + f", global step {_num(ckpt['global_step'])}, epoch {_num(ckpt['epoch'])}",
        f"- Library version: tar_lightning {lib['version']} (export)"
        + (f"; trained with {run['trained_with_library_version']}" if run and run["trained_with_library_version"]
           else ""),
    ]
    if run is None:
        lines.append("- Recipe and resolved configuration: not recorded (the checkpoint was not written by "
                     "`tar-lightning fit`)")
    else:
        files = run["config_files"] or []
        shown = ", ".join(f"`{_shown_path(f['path'])}`" + (f" (sha256 {f['sha256'][:12]})" if f.get("sha256")
                                              else " (not a file: inline YAML)") for f in files)
        lines.append(f"- Recipe (--config files): {shown or 'none'}")
        if run["launch_args"] is not None:
            lines.append(f"- Command: `tar-lightning {' '.join(run['launch_args'])}`")
        if run["config_yaml"]:
            lines.append(f"- Resolved configuration: below (the run wrote it to `{_shown_path(run['config_yaml'])}`)")
    export = facts["export"]
    lines.append(f"- Export: dtype {export['dtype'] or 'as trained'}, tokenizer from {export['tokenizer']}")
    red = facts["redteam"]
    lines += ["", "## Red team", ""]
    if red is None:
        lines.append("No red-team results were given to the export (`tar-lightning export --redteam FOLDER`).")
    else:
        safety = red["safety"]
        worst, bounded = red["worst_case"], red["bounded_worst_case"]
        model = red["model"] if isinstance(red["model"], Mapping) else {}
        attacked = (f"`{model['source']}`" if model.get("source") else
                    f"a {model.get('module', '?')} module (weights {model.get('weights', '?')})")
        lines += [
            f"Red-teamed model: {attacked}.",
            "",
            f"Suite `{red['suite']}`, {red['runs']} run(s), results in `{Path(red['folder']).name}`. Safety metric "
            f"`{safety.get('metric')}` ({safety.get('direction')}), recovery threshold "
            f"{_num(safety.get('recovery_threshold'))}.",
            "",
            "| score | attack | safety after |",
            "|---|---|---|",
            f"| suite mean | | {_num(red['suite_mean'])} |",
            f"| worst case | {worst.get('attack')} | {_num(worst.get('safety_after'))} |",
            f"| bounded worst case | {bounded.get('attack')} | {_num(bounded.get('safety_after'))} |",
            "",
            "Broke the safeguard: " + (", ".join(f"`{b}`" for b in red["broken"]) or "none"),
            "",
            "| attack | seeds | safety before | safety after | capability before | capability after | broke |",
            "|---|---|---|---|---|---|---|",
        ]
        for attack, a in red["attacks"].items():
            lines.append(f"| {attack} | {_num(a['seeds'])} | {_num(a['safety_before'])} | {_num(a['safety_after'])} "
                         f"| {_num(a['capability_before'])} | {_num(a['capability_after'])} | {_num(a['broke'])} |")
    if run is not None and run["config"] is not None:
        lines += ["", "## Resolved configuration", "", "```yaml",
                  yaml.safe_dump(run["config"], sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: str | os.PathLike, facts: Mapping[str, Any]) -> None:
    """Write ``README.md`` and :data:`CARD_JSON` into an export folder (each atomically)."""
    out = Path(out_dir)
    atomic_write_text(out / CARD_JSON, json.dumps(facts, indent=1) + "\n", what="model card")
    atomic_write_text(out / "README.md", model_card_markdown(facts, card_title(facts, out.name)), what="model card")
