"""Running lm-evaluation-harness on a live (in-memory) model, online or offline on local WMDP/MMLU files.

lm-evaluation-harness is optional and imported only when :func:`run_lm_eval` is called
(``pip install 'tar_lightning[lmeval]'``, which installs ``lm_eval[hf]`` 0.4.x).

Its ``wmdp_*`` and ``mmlu_*`` tasks read ``cais/wmdp`` / ``cais/mmlu`` from the hub. With a data root (a folder
laid out like ``wmdp/wmdp-bio-questions.json`` and ``mmlu/{test,dev}/<subject>_{test,dev}.csv``, the layout
:func:`tar_lightning.evaluation.mcq.resolve_task` reads), :func:`run_lm_eval` runs lm-eval's OWN task
configuration on the local files instead, with only the data source replaced: for each task a small YAML file
``include``-s lm-eval's installed task YAML (its prompt template, description, choices, target, split names and
metric are kept as they are) and sets ``dataset_path: json`` with ``data_files`` pointing at the local data.
WMDP files are read as they are (they already have lm-eval's ``question``/``choices``/``answer`` fields); MMLU
CSV files (``question,choice0..choice3,answer`` columns) are first written as JSON lines with the hub dataset's
fields (``question``, ``subject``, ``choices``, ``answer``) into a temporary folder. Nothing is fetched from the
network, so this works with ``HF_DATASETS_OFFLINE=1``.

:func:`tar_lightning.evaluation.mcq.score_mcq` reproduces lm-eval's default scoring without lm-eval; the slow test
``tests/test_lm_eval_parity.py`` checks, question by question, that both give the same log-likelihoods.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.mcq import DATA_ROOT_ENV, MMLU_SUBJECTS, get_task, load_mcq, resolve_task

__all__ = ["run_lm_eval", "write_local_task_configs"]

_INSTALL_HINT = "pip install 'tar_lightning[lmeval]'  (or: pip install 'lm_eval[hf]>=0.4.13,<0.5')"


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        lm_eval = importlib.import_module("lm_eval")
        hf = importlib.import_module("lm_eval.models.huggingface")
        tasks = importlib.import_module("lm_eval.tasks")
    except ImportError as e:
        raise ConfigError(
            f"run_lm_eval needs lm-evaluation-harness, which is not installed ({e}); install it with: {_INSTALL_HINT}"
        ) from e
    return lm_eval, hf.HFLM, tasks.TaskManager


def _task_list(tasks: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    elif isinstance(tasks, Sequence):
        names = [t.strip() if isinstance(t, str) else t for t in tasks]
    else:
        raise ConfigError(f"tasks must be a comma-separated string or a list of task names, got {tasks!r}")
    bad = [t for t in names if not isinstance(t, str) or not t]
    if bad or not names:
        raise ConfigError(f"tasks must be non-empty task names (e.g. 'wmdp_bio,mmlu'), got {tasks!r}")
    return names


def _mmlu_jsonl(csv_path: Path, out: Path) -> Path:
    """Write an MMLU CSV (any layout :func:`~tar_lightning.evaluation.mcq.load_mcq` reads) as JSON lines with the
    hub dataset's fields."""
    with out.open("w", encoding="utf-8") as fh:
        for item in load_mcq(csv_path):
            record = {"question": item.question, "subject": item.subject, "choices": item.choices,
                      "answer": item.answer}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def write_local_task_configs(
    tasks: Union[str, Sequence[str]], data_root: Union[str, os.PathLike], folder: Union[str, os.PathLike],
    task_manager: Any = None,
) -> list[str]:
    """Write one lm-eval task YAML per task into ``folder``: lm-eval's own task, reading the local files.

    Args:
        tasks: ``wmdp_bio``, ``wmdp_chem``, ``wmdp_cyber``, ``mmlu_<subject>``, or ``mmlu`` (expanded to its 57
            subject tasks; lm-eval's ``mmlu`` group average is not formed: each subject is reported on its own).
        data_root: the local data folder (see the module docstring for its layout).
        folder: where the YAML files (and converted MMLU files) go; it must outlive the evaluation.
        task_manager: an ``lm_eval.tasks.TaskManager`` (built when ``None``), used to find each task's YAML.

    Returns:
        The YAML paths, one per task, to pass to ``simple_evaluate(tasks=...)``. The task names are lm-eval's,
        so results are keyed as usual (``results["wmdp_bio"]``).

    Raises:
        ConfigError: a task that has no local layout, or that this lm-eval does not define as a YAML task.
        DataError: the data root lacks a task's file (the message names the path expected).
    """
    _, _, TaskManager = _import_lm_eval()
    names = _task_list(tasks)
    expanded: list[str] = []
    for name in names:
        if name == "mmlu":
            expanded.extend(f"mmlu_{s}" for s in MMLU_SUBJECTS)
        else:
            expanded.append(name)
    manager = task_manager if task_manager is not None else TaskManager()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in expanded:
        if not (name.startswith("wmdp_") or name.startswith("mmlu_")):
            raise ConfigError(
                f"lm-eval task {name!r} has no local data layout; with a data root only wmdp_bio, wmdp_chem, "
                "wmdp_cyber, mmlu and mmlu_<subject> can run (run other tasks without data_root, from the hub)"
            )
        spec, local = resolve_task(get_task(name), data_root)  # ConfigError / DataError with the path expected
        entry = manager.task_index.get(spec.name)
        yaml_path = getattr(entry, "yaml_path", None)
        if yaml_path is None:
            raise ConfigError(f"this lm-eval does not define the task {spec.name!r} as a YAML task")
        local_path = Path(local).resolve()
        if spec.name.startswith("mmlu_"):
            subject = spec.name[len("mmlu_"):]
            data_files = {"test": str(_mmlu_jsonl(local_path, folder / f"{spec.name}_test.jsonl"))}
            dev = local_path.parent.parent / "dev" / f"{subject}_dev.csv"
            if dev.is_file():  # lm-eval's MMLU draws few-shot examples from the dev split
                data_files["dev"] = str(_mmlu_jsonl(dev, folder / f"{spec.name}_dev.jsonl"))
        else:
            data_files = {"test": str(local_path)}
        config = {
            "include": str(Path(yaml_path).resolve()),
            "task": spec.name,
            "dataset_path": "json",
            "dataset_name": None,
            # the datasets cache goes into the same temporary folder: nothing is left in the user's HF cache
            "dataset_kwargs": {"data_files": data_files, "cache_dir": str(folder / "datasets_cache")},
        }
        out = folder / f"{spec.name}.yaml"
        out.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
        paths.append(str(out))
    return paths


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Union[str, Sequence[str]],
    batch_size: int = 8,
    limit: Optional[Union[int, float]] = None,
    *,
    data_root: Union[str, os.PathLike, None] = None,
    num_fewshot: Optional[int] = None,
    apply_chat_template: bool = False,
    system_instruction: Optional[str] = None,
    log_samples: bool = False,
    hflm_kwargs: Optional[dict] = None,
    **kw: Any,
) -> dict:
    """Evaluate an in-memory Hugging Face model with ``lm_eval.simple_evaluate``.

    The model is wrapped as ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer,
    batch_size=batch_size, **hflm_kwargs)`` (no reload, no copy); its train/eval mode is restored afterwards.

    Args:
        model: a ``transformers`` causal LM.
        tokenizer: its tokenizer.
        tasks: lm-eval task names (``"wmdp_bio,mmlu"`` or a list).
        batch_size: lm-eval batch size.
        limit: lm-eval ``limit`` (questions per task, or a fraction).
        data_root: run the ``wmdp_*`` / ``mmlu*`` tasks offline on the files under this folder (see the module
            docstring); ``None`` reads the environment variable ``TAR_LIGHTNING_DATA``, and with neither lm-eval
            reads the hub (network or a populated datasets cache). Note that the local WMDP files may be the
            original release, larger than the hub's filtered version.
        num_fewshot: few-shot examples (``None``: the task's default, 0 for WMDP/MMLU).
        apply_chat_template: lm-eval ``apply_chat_template``.
        system_instruction: lm-eval ``system_instruction``.
        log_samples: keep per-sample outputs in the result (``"samples"``) for question-by-question comparison.
        hflm_kwargs: further ``HFLM`` arguments (``max_length``, ``add_bos_token`` ...).
        **kw: further ``simple_evaluate`` arguments.

    Returns:
        The dict ``simple_evaluate`` returns (``results[task]["acc,none"]`` ...).

    Raises:
        ConfigError: lm-eval is not installed (the message says how to install it), bad ``tasks``, or a task with
            no local layout while a data root is in use.
        DataError: the data root lacks a task's file.
    """
    names = _task_list(tasks)
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if data_root is None and os.environ.get(DATA_ROOT_ENV, "").strip():
        data_root = os.environ[DATA_ROOT_ENV].strip()
    was_training = getattr(model, "training", False)
    with tempfile.TemporaryDirectory(prefix="tar_lm_eval_tasks.") as folder:
        manager = kw.pop("task_manager", None) or TaskManager()
        specs: list[str] = names
        if data_root is not None:
            specs = write_local_task_configs(names, data_root, folder, task_manager=manager)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=num_fewshot,
                limit=limit,
                apply_chat_template=apply_chat_template,
                system_instruction=system_instruction,
                log_samples=log_samples,
                task_manager=manager,
                **kw,
            )
        finally:
            if hasattr(model, "train"):
                model.train(was_training)
