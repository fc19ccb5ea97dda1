"""Running lm-evaluation-harness on a live (in-memory) model, for cross-checking our own MCQ evaluation.

lm-evaluation-harness is optional and imported only when :func:`run_lm_eval` is called
(``pip install 'lm_eval[hf]'``). Its WMDP and MMLU tasks read ``cais/wmdp`` / ``cais/mmlu`` from the hub, so this
needs network or a populated Hugging Face datasets cache; :func:`tar_lightning.evaluation.mcq.score_mcq`
reproduces its default scoring offline.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Optional, Union

from tar_lightning.errors import ConfigError

__all__ = ["run_lm_eval"]

_INSTALL_HINT = "pip install 'lm_eval[hf]'"


def _import_lm_eval() -> tuple[Any, Any]:
    try:
        lm_eval = importlib.import_module("lm_eval")
        hf = importlib.import_module("lm_eval.models.huggingface")
    except ImportError as e:
        raise ConfigError(
            f"run_lm_eval needs lm-evaluation-harness, which is not installed ({e}); install it with: {_INSTALL_HINT}"
        ) from e
    return lm_eval, hf.HFLM


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


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Union[str, Sequence[str]],
    batch_size: int = 8,
    limit: Optional[Union[int, float]] = None,
    *,
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
        num_fewshot: few-shot examples (``None``: the task's default, 0 for WMDP/MMLU).
        apply_chat_template: lm-eval ``apply_chat_template``.
        system_instruction: lm-eval ``system_instruction``.
        log_samples: keep per-sample outputs in the result (``"samples"``) for question-by-question comparison.
        hflm_kwargs: further ``HFLM`` arguments (``max_length``, ``add_bos_token`` ...).
        **kw: further ``simple_evaluate`` arguments.

    Returns:
        The dict ``simple_evaluate`` returns (``results[task]["acc,none"]`` ...).

    Raises:
        ConfigError: lm-eval is not installed (the message says how to install it), or bad ``tasks``.
    """
    names = _task_list(tasks)
    lm_eval, HFLM = _import_lm_eval()
    was_training = getattr(model, "training", False)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            apply_chat_template=apply_chat_template,
            system_instruction=system_instruction,
            log_samples=log_samples,
            **kw,
        )
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
