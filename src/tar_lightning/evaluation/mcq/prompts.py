"""MCQ prompts as lm-evaluation-harness renders them: the context (:func:`format_context`, with or without a chat
template and system prompt), the scored continuations (:func:`continuations`) and setting names (:func:`setting_label`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.mcq.items import LETTERS, MCQItem

__all__ = ["MCQ_VARIANTS", "check_variant", "continuations", "format_context", "setting_label"]

log = logging.getLogger(__name__)

#: The prompt variants: ``letter`` (lm-eval's standard), ``cloze`` and ``raw``.
MCQ_VARIANTS = ("letter", "cloze", "raw")


def check_variant(variant: str) -> str:
    """``variant`` itself when it is one of :data:`MCQ_VARIANTS`.

    Raises:
        ConfigError: any other variant (the message lists the valid ones).
    """
    if variant not in MCQ_VARIANTS:
        raise ConfigError(f"unknown MCQ variant {variant!r}; expected one of {list(MCQ_VARIANTS)}")
    return variant


def _description(subject: str, variant: str) -> str:
    kind = "multiple choice questions" if variant == "letter" else "questions"
    subject = subject.replace("_", " ").strip()
    about = f" about {subject}" if subject else ""
    return f"The following are {kind} (with answers){about}.\n\n"


def _question_text(item: MCQItem, variant: str) -> str:
    if variant == "cloze":
        return f"Question: {item.question.strip()}\nAnswer:"
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def _render_chat(tokenizer: Any, messages: list[dict]) -> str:
    if tokenizer is None:
        raise ConfigError("chat_template=True needs the tokenizer (to apply its chat template)")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"chat_template=True, but the tokenizer {type(tokenizer).__name__} has no chat template"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError: e.g. a template that refuses a system role
        if messages and messages[0]["role"] == "system":
            log.warning("chat template failed (%s); retrying without the system message, as lm-eval does", e)
            return _render_chat(tokenizer, messages[1:])
        raise ConfigError(f"cannot apply the tokenizer's chat template: {e}") from e


def format_context(
    item: MCQItem,
    subject: Optional[str] = None,
    *,
    variant: str = "letter",
    chat_template: bool = False,
    system_prompt: Optional[str] = None,
    tokenizer: Any = None,
) -> str:
    """The context string of one question, exactly as lm-evaluation-harness 0.4 renders it zero-shot.

    Args:
        item: the question.
        subject: the subject in the description (``_`` become spaces); default ``item.subject``; with no subject
            at all the description reads ``"The following are multiple choice questions (with answers).\\n\\n"``.
        variant: ``"letter"`` (the standard format), ``"cloze"`` (``mmlu_continuation`` style) or ``"raw"``
            (the question text as is).
        chat_template: render with the tokenizer's chat template (description as system message, question as user
            message, generation prompt added).
        system_prompt: prepended to the description (joined with ``"\\n\\n"``), in the system message under a
            chat template.
        tokenizer: needed for ``chat_template=True``.

    Returns:
        The context; the continuations are :func:`continuations`.
    """
    check_variant(variant)
    if variant == "raw":
        if chat_template:
            raise ConfigError("the 'raw' MCQ variant scores plain question stems; it has no chat-template form")
        return item.question if system_prompt is None else f"{system_prompt}\n\n{item.question}"
    description = _description(item.subject if subject is None else subject, variant)
    system = description if system_prompt is None else f"{system_prompt}\n\n{description}"
    text = _question_text(item, variant)
    if not chat_template:
        return system + text
    return _render_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": text}])


def continuations(item: MCQItem, variant: str = "letter", chat_template: bool = False) -> list[str]:
    """The strings scored after the context: ``" A"``, ``" B"``, ... (letter) or ``" {choice}"`` (cloze, raw).

    Under a chat template the leading space is dropped (lm-eval's target delimiter becomes ``""``).
    """
    check_variant(variant)
    delim = "" if chat_template else " "
    if variant == "letter":
        return [f"{delim}{LETTERS[i]}" for i in range(len(item.choices))]
    return [f"{delim}{c}" for c in item.choices]


def setting_label(variant: str, chat_template: bool, system_prompt: Optional[str]) -> str:
    """A short name of one evaluation setting: ``letter``, ``letter+chat``, ``cloze+chat+system`` ..."""
    return variant + ("+chat" if chat_template else "") + ("+system" if system_prompt is not None else "")
