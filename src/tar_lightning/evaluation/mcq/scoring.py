"""Scoring MCQs with a causal LM: encoding (context, continuation) pairs into forward rows (cached per tokenizer),
running them batched, :func:`score_mcq` and its :class:`MCQResult`, and :func:`evaluate_mcq_task` (a named task
in every requested setting). The protocol is described in :mod:`tar_lightning.evaluation.mcq`.
"""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from tar_lightning.common import is_int
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.evaluation.mcq.items import LETTERS, MCQItem
from tar_lightning.evaluation.mcq.prompts import (
    MCQ_VARIANTS,
    check_variant,
    continuations,
    format_context,
    setting_label,
)
from tar_lightning.evaluation.mcq.tasks import MCQTask, load_task_items
from tar_lightning.evaluation.progress import progress as progress_bar

__all__ = ["MCQResult", "evaluate_mcq_task", "score_mcq"]


@dataclass
class MCQResult:
    """The outcome of scoring a set of questions in one setting.

    Attributes:
        accuracy: fraction of questions whose top-scoring choice is the answer (torchmetrics
            ``MulticlassAccuracy(average="micro")`` of predictions vs answers).
        n: number of questions.
        variant: ``"letter"``, ``"cloze"`` or ``"raw"``.
        chat_template: whether the chat template was applied.
        system_prompt: the system prompt used, if any.
        records: one dict per question, in input order: ``index``, ``subject``, ``answer``, ``pred``, ``correct``,
            ``scores`` (summed log-probability of every choice's continuation; comparable to lm-eval's per-sample
            ``resps``), plus ``pred_norm`` for cloze.
        pred_histogram: fraction of the questions predicted as each letter (a small model often collapses onto
            one letter).
        answer_histogram: fraction of the questions whose answer is each letter.
        acc_norm: cloze only: accuracy of the length-normalised scores (log-prob / characters of the choice, as
            lm-eval's ``acc_norm``).
        subject_accuracy: accuracy per subject, when the questions span several subjects.
        task: the task name, when known.
        forward_passes: number of model forward calls made.
    """

    accuracy: float
    n: int
    variant: str = "letter"
    chat_template: bool = False
    system_prompt: Optional[str] = None
    records: list[dict] = field(default_factory=list)
    pred_histogram: dict[str, float] = field(default_factory=dict)
    answer_histogram: dict[str, float] = field(default_factory=dict)
    acc_norm: Optional[float] = None
    subject_accuracy: dict[str, float] = field(default_factory=dict)
    task: str = ""
    forward_passes: int = 0

    @property
    def setting(self) -> str:
        return setting_label(self.variant, self.chat_template, self.system_prompt)

    @property
    def preds(self) -> list[int]:
        return [r["pred"] for r in self.records]

    def to_dict(self, records: bool = True) -> dict:
        """A JSON-serialisable dict of everything (``records=False`` leaves out the per-question records)."""
        out = {
            "task": self.task,
            "setting": self.setting,
            "variant": self.variant,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "accuracy": self.accuracy,
            "acc_norm": self.acc_norm,
            "n": self.n,
            "pred_histogram": dict(self.pred_histogram),
            "answer_histogram": dict(self.answer_histogram),
            "subject_accuracy": dict(self.subject_accuracy),
            "forward_passes": self.forward_passes,
        }
        if records:
            out["records"] = [dict(r) for r in self.records]
        return out


@dataclass
class _Row:
    """One input sequence and the (question, choice, positions, tokens) log-probs to read from it."""

    ids: list[int]
    gathers: list[tuple[int, int, list[int], list[int]]]


def _max_length(model: Any, tokenizer: Any) -> int:
    """The model's context length as lm-eval's ``HFLM.max_length`` finds it."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return 2048


def _encode_all(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 1024):
        out.extend(
            list(ids)
            for ids in tokenizer(texts[i : i + 1024], add_special_tokens=add_special_tokens)["input_ids"]
        )
    return out


def _build_rows(
    tokenizer: Any,
    contexts: list[str],
    conts: list[list[str]],
    max_len: int,
    add_special_tokens: bool,
) -> list[_Row]:
    """Encode (context, continuation) pairs like lm-eval's ``_encode_pair`` and plan the forward passes."""
    ctx_texts: list[str] = []
    whole_texts: list[str] = []
    for ctx, cs in zip(contexts, conts, strict=True):
        n_spaces = len(ctx) - len(ctx.rstrip())
        head, tail = (ctx[:-n_spaces], ctx[-n_spaces:]) if n_spaces else (ctx, "")
        ctx_texts.append(head)
        whole_texts.extend(head + tail + c for c in cs)
    ctx_encs = _encode_all(tokenizer, ctx_texts, add_special_tokens)
    whole_encs = _encode_all(tokenizer, whole_texts, add_special_tokens)

    rows: list[_Row] = []
    k = 0
    for q, (ctx_enc, cs) in enumerate(zip(ctx_encs, conts, strict=True)):
        if not ctx_enc:
            raise DataError(f"question {q}: the context encodes to no tokens")
        cont_encs = [whole_encs[k + j][len(ctx_enc) :] for j in range(len(cs))]
        k += len(cs)
        for j, enc in enumerate(cont_encs):
            if not enc:
                raise DataError(
                    f"question {q}: choice {j} ({cs[j]!r}) encodes to no tokens after the context"
                )
            if len(enc) > max_len:
                raise DataError(
                    f"question {q}: choice {j} has {len(enc)} tokens, more than the model's {max_len}"
                )
        lengths = {len(e) for e in cont_encs}
        shared = len(lengths) == 1 and all(e[:-1] == cont_encs[0][:-1] for e in cont_encs)
        if shared:
            # One sequence: context + the common continuation prefix; every choice differs only in its last token.
            ids = (ctx_enc + cont_encs[0][:-1])[-max_len:]
            n, m = len(ids), len(cont_encs[0])
            positions = list(range(n - m, n))
            rows.append(_Row(ids, [(q, j, positions, enc) for j, enc in enumerate(cont_encs)]))
        else:
            for j, enc in enumerate(cont_encs):
                ids = (ctx_enc + enc)[-(max_len + 1) :][:-1]
                n, m = len(ids), len(enc)
                rows.append(_Row(ids, [(q, j, list(range(n - m, n)), enc)]))
    return rows


#: Recent question encodings, most recent last: ``key -> (tokenizer, rows)``. Rows depend only on the tokenizer and
#: the texts, and evaluators score the same questions again after every few attack steps, so they are encoded once.
_ROWS_CACHE: OrderedDict[tuple, tuple[Any, list[_Row]]] = OrderedDict()
_ROWS_CACHE_SIZE = 8


def _rows_for(
    tokenizer: Any,
    contexts: list[str],
    conts: list[list[str]],
    max_len: int,
    add_special_tokens: bool,
) -> list[_Row]:
    """:func:`_build_rows`, reusing the rows of an earlier call with the same tokenizer object and texts."""
    try:
        vocab = len(tokenizer)  # tokens added to the same tokenizer object change the key
    except TypeError:
        vocab = None
    key = (id(tokenizer), vocab, max_len, add_special_tokens, tuple(contexts), tuple(tuple(c) for c in conts))
    hit = _ROWS_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        _ROWS_CACHE.move_to_end(key)
        return hit[1]
    rows = _build_rows(tokenizer, contexts, conts, max_len, add_special_tokens)
    _ROWS_CACHE[key] = (tokenizer, rows)  # holding the tokenizer keeps its id from being reused
    while len(_ROWS_CACHE) > _ROWS_CACHE_SIZE:
        _ROWS_CACHE.popitem(last=False)
    return rows


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _run_rows(
    model: Any, rows: list[_Row], n_choices: list[int], batch_size: int, pad_id: int, progress: Optional[str] = None
):
    """Forward the rows ``batch_size`` at a time (longest first, right-padded); summed log-probs per choice.

    With ``progress`` (a label), progress over the forward batches is shown on stderr (:mod:`.progress`).
    """
    scores = [[math.nan] * k for k in n_choices]
    device = next(model.parameters()).device
    keep_ok = _supports_logits_to_keep(model)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].ids))
    passes = 0
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, total=len(starts), desc=progress or "", unit="batch",
                              enabled=progress is not None):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        width = max(len(r.ids) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, row in enumerate(chunk):
            ids[b, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
            mask[b, : len(row.ids)] = 1
        first = min(g[2][0] for row in chunk for g in row.gathers)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "use_cache": False,
        }
        if keep_ok:
            kwargs["logits_to_keep"] = width - first
        logits = model(**kwargs).logits
        passes += 1
        offset = width - logits.shape[1]  # position p is logits[:, p - offset]
        # One log-softmax over the vocabulary of every kept position and one gather of every (row, position,
        # token) read; the sum of each choice's tokens is then taken per group of equal-length choices.
        logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        by_length: dict[int, tuple[list[tuple[int, int]], list[int], list[int], list[int]]] = {}
        for b, row in enumerate(chunk):
            for q, j, positions, tokens in row.gathers:
                keys, bs, ps, ts = by_length.setdefault(len(tokens), ([], [], [], []))
                keys.append((q, j))
                bs.extend([b] * len(tokens))
                ps.extend(p - offset for p in positions)
                ts.extend(tokens)
        for m, (keys, bs, ps, ts) in by_length.items():
            index = [torch.tensor(x, device=logp.device) for x in (bs, ps, ts)]
            sums = logp[index[0], index[1], index[2]].view(len(keys), m).sum(dim=1).tolist()
            for (q, j), value in zip(keys, sums, strict=True):
                scores[q][j] = value
    return scores, passes


def _argmax(values: Sequence[float]) -> int:
    """Index of the maximum; the first one on ties (as ``numpy.argmax`` in lm-eval)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _accuracy(preds: list[int], targets: list[int], num_classes: int) -> float:
    metric = MulticlassAccuracy(num_classes=max(num_classes, 2), average="micro")
    value = float(metric(torch.tensor(preds), torch.tensor(targets)))
    # torchmetrics returns float32; snap to the exact fraction k / n it stands for.
    return round(value * len(preds)) / len(preds)


def _histogram(values: list[int], num_classes: int) -> dict[str, float]:
    counts = Counter(values)
    n = max(len(values), 1)
    return {LETTERS[i]: counts.get(i, 0) / n for i in range(num_classes)}


def score_mcq(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCQItem],
    *,
    variant: str = "letter",
    chat_template: bool = False,
    system_prompt: Optional[str] = None,
    batch_size: int = 16,
    subject: Optional[str] = None,
    max_length: Optional[int] = None,
    add_special_tokens: bool = False,
    task: str = "",
    progress: bool = False,
) -> MCQResult:
    """Score multiple-choice questions with a causal LM (see :mod:`tar_lightning.evaluation.mcq` for the exact protocol).

    Args:
        model: a Hugging Face causal LM (any device and dtype; log-softmax runs in fp32). Put into eval mode for
            the call and restored to its previous mode afterwards; no gradients are recorded.
        tokenizer: its tokenizer.
        items: the questions.
        variant: ``"letter"`` (default, lm-eval's standard), ``"cloze"`` (answer-text log-likelihood) or ``"raw"``
            (the bare question stem followed by each choice; summed log-probability).
        chat_template: apply the tokenizer's chat template (lm-eval ``--apply_chat_template``).
        system_prompt: a system prompt (lm-eval ``--system_instruction``).
        batch_size: sequences per forward pass (a question is one sequence when its continuations differ only in
            the last token, otherwise one per choice).
        subject: the subject in every prompt (default: each item's own).
        max_length: left-truncate inputs to this many tokens (default: the model's context length as lm-eval
            reads it from the config).
        add_special_tokens: encode with the tokenizer's special tokens (BOS); ``False`` is lm-eval's default for
            causal LMs (``add_bos_token=False``).
        task: a name stored in the result.
        progress: show progress over the forward batches on stderr, labelled with the task and setting (a bar on
            a terminal, plain lines otherwise: :func:`tar_lightning.evaluation.progress.progress`).

    Returns:
        An :class:`MCQResult`.

    Raises:
        ConfigError: no items, bad variant or batch size, chat template requested but missing.
        DataError: a continuation that encodes to no tokens.
    """
    check_variant(variant)
    items = list(items)
    if not items:
        raise ConfigError("score_mcq: no questions to score")
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    max_len = max_length if max_length is not None else _max_length(model, tokenizer)
    contexts = [
        format_context(
            it,
            subject,
            variant=variant,
            chat_template=chat_template,
            system_prompt=system_prompt,
            tokenizer=tokenizer,
        )
        for it in items
    ]
    conts = [continuations(it, variant, chat_template) for it in items]
    rows = _rows_for(tokenizer, contexts, conts, max_len, add_special_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            label = f"{task or 'mcq'} {setting_label(variant, bool(chat_template), system_prompt)}"
            scores, passes = _run_rows(model, rows, [len(c) for c in conts], batch_size, pad_id,
                                       label if progress else None)
    finally:
        model.train(was_training)

    num_classes = max(len(it.choices) for it in items)
    preds = [_argmax(s) for s in scores]
    targets = [it.answer for it in items]
    records = []
    norm_preds: list[int] = []
    for i, (it, s, p) in enumerate(zip(items, scores, preds, strict=True)):
        rec = {
            "index": i,
            "subject": subject if subject is not None else it.subject,
            "answer": it.answer,
            "pred": p,
            "correct": p == it.answer,
            "scores": s,
        }
        if variant == "cloze":
            pn = _argmax([v / max(len(c), 1) for v, c in zip(s, it.choices, strict=True)])
            norm_preds.append(pn)
            rec["pred_norm"] = pn
        records.append(rec)

    subjects = sorted({r["subject"] for r in records})
    subject_accuracy = {}
    if len(subjects) > 1:
        for s in subjects:
            rs = [r for r in records if r["subject"] == s]
            subject_accuracy[s] = sum(r["correct"] for r in rs) / len(rs)
    return MCQResult(
        accuracy=_accuracy(preds, targets, num_classes),
        n=len(items),
        variant=variant,
        chat_template=bool(chat_template),
        system_prompt=system_prompt,
        records=records,
        pred_histogram=_histogram(preds, num_classes),
        answer_histogram=_histogram(targets, num_classes),
        acc_norm=_accuracy(norm_preds, targets, num_classes) if variant == "cloze" else None,
        subject_accuracy=subject_accuracy,
        task=task,
        forward_passes=passes,
    )


def _as_settings(value: Any, what: str) -> list:
    if isinstance(value, str) and what == "chat_template":
        if value == "both":
            return [False, True]
        raise ConfigError(f"chat_template must be true, false or 'both', got {value!r}")
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def evaluate_mcq_task(
    model: Any,
    tokenizer: Any,
    task: Union[str, MCQTask],
    data_root: Union[str, os.PathLike, None] = None,
    limit: Optional[int] = None,
    variants: Sequence[str] = ("letter",),
    *,
    chat_template: Union[bool, str, Sequence[bool]] = False,
    system_prompt: Union[None, str, Sequence[Optional[str]]] = None,
    batch_size: int = 16,
    max_length: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Load a named task (see :data:`MCQ_TASKS`) and score it in every requested setting.

    Args:
        model, tokenizer: the model to evaluate.
        task: a task name or :class:`MCQTask`.
        data_root: folder laid out as ``wmdp/wmdp-<bio|chem|cyber>-questions.json``, ``mmlu/test/<subject>_test.csv`` (default: ``$TAR_LIGHTNING_DATA``, else the hub).
        limit: score only the first ``limit`` questions.
        variants: any of ``"letter"``, ``"cloze"``, ``"raw"``.
        chat_template: ``False``, ``True``, ``"both"``, or a list of booleans.
        system_prompt: ``None``, a string, or a list of ``None``/strings (e.g. ``[None, "You are ..."]`` for with
            and without).
        batch_size, max_length, progress: see :func:`score_mcq` (progress per setting).

    Returns:
        ``{"task", "source", "n", "results": {setting label: MCQResult.to_dict()}}``; the setting labels come from
        :func:`setting_label` (``"letter"``, ``"letter+chat"``, ``"cloze+system"`` ...).
    """
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    if not variants:
        raise ConfigError("variants: give at least one of " + ", ".join(MCQ_VARIANTS))
    for v in variants:
        check_variant(v)
    chats = _as_settings(chat_template, "chat_template")
    systems = _as_settings(system_prompt, "system_prompt")
    spec, items, where = load_task_items(task, data_root, limit)
    results: dict[str, dict] = {}
    for variant in variants:
        for chat in chats:
            for system in systems:
                res = score_mcq(
                    model,
                    tokenizer,
                    items,
                    variant=variant,
                    chat_template=bool(chat),
                    system_prompt=system,
                    batch_size=batch_size,
                    max_length=max_length,
                    task=spec.name,
                    progress=progress,
                )
                results[res.setting] = res.to_dict()
    return {"task": spec.name, "source": where, "n": len(items), "results": results}
