"""Turning records into token ids and labels, and packing them into a pool that bundles index into.

Plain text: ``labels == input_ids`` (the model shifts internally), an EOS appended. Chat data (prompt/response
or messages): rendered with the tokenizer's chat template; the prompt tokens (everything up to and including
the generation prompt) are labelled -100, the response tokens up to and including the first end-of-sequence
token after them are labelled, and template text after that EOS is cut off.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from tar_lightning.common import is_int
from tar_lightning.data.sources import DataSource, as_source, chat_messages, load_records, source_text
from tar_lightning.errors import ConfigError, DataError

__all__ = ["IGNORE_INDEX", "TokenPool", "check_tokenizer", "tokenize_records", "tokenize_source"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CHUNK = 2048


def check_tokenizer(tokenizer: Any, what: str = "data") -> None:
    """Check the tokenizer can pad; never sets a pad token itself (that choice belongs to the model owner).

    Raises:
        ConfigError: no tokenizer, or a tokenizer without a pad token.
    """
    if tokenizer is None:
        raise ConfigError(f"{what}: no tokenizer given")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ConfigError(
            f"{what}: the tokenizer {type(tokenizer).__name__} has no pad token; set one before building data "
            "(e.g. tokenizer.pad_token = tokenizer.eos_token, as tar_lightning.models does for the models it loads)"
        )


def _encode(tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), _CHUNK):
        out.extend(tokenizer(list(texts[i : i + _CHUNK]), **kwargs)["input_ids"])
    return out


def _render(
    tokenizer: Any, messages: list[dict], generation_prompt: bool, source: DataSource, index: int
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:
        raise DataError(
            f"data source {source.label()}: record {index}: the tokenizer's chat template cannot render the "
            f"messages {[m['role'] for m in messages]} ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(text, str):
        raise DataError(
            f"data source {source.label()}: the chat template returned {type(text).__name__}, not text"
        )
    return text


def _span_labels(records, source, tokenizer, texts, seq_len) -> list[list[int]]:
    """Token ids whose label is kept only where the token overlaps the record's labelled character span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"data source {source.label()}: 'label_span' needs a fast tokenizer (offset mapping)")
    start_key, end_key = source.label_span
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=seq_len,
                    return_offsets_mapping=True)
    out = []
    for i, (record, offsets) in enumerate(zip(records, enc["offset_mapping"], strict=True)):
        try:
            lo, hi = int(record[start_key]), int(record[end_key])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"data source {source.label()}: record {i}: 'label_span' fields {source.label_span} must hold "
                f"integer character offsets ({type(e).__name__}: {e})"
            ) from e
        out.append([1 if (b > lo and a < hi and b > a) else 0 for a, b in offsets])
    return out


def _tokenize_plain(records, source, tokenizer, seq_len, add_eos) -> tuple[list[dict], int]:
    texts = [source_text(r, source, i) for i, r in enumerate(records)]
    ids_list = _encode(tokenizer, texts, add_special_tokens=True, truncation=True, max_length=seq_len)
    keep = _span_labels(records, source, tokenizer, texts, seq_len) if source.label_span else None
    eos = tokenizer.eos_token_id
    examples, short = [], 0
    for i, ids in enumerate(ids_list):
        ids = list(ids)
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids = ids[:seq_len]
        if len(ids) < 2:
            short += 1  # a single token has no next-token target
            continue
        if keep is None:
            labels = list(ids)
        else:
            # only the span's tokens are targets (e.g. a fact's answer); the appended EOS is not
            mask = keep[i] + [0] * (len(ids) - len(keep[i]))
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=False)]
            if all(t == IGNORE_INDEX for t in labels):
                short += 1
                continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, short


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize_chat(records, source, tokenizer, seq_len, add_eos) -> tuple[list[dict], int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"data source {source.label()}: chat data (prompt_field/response_field or messages_field) needs a "
            f"tokenizer with a chat template, and {type(tokenizer).__name__} has none"
        )
    prompts, rests, fallback = [], [], {}
    kept = []
    no_answer = 0
    for i, r in enumerate(records):
        prompt_msgs, full_msgs = chat_messages(r, source, i)
        if not full_msgs:
            no_answer += 1
            continue
        prompt_text = _render(tokenizer, prompt_msgs, True, source, i)
        full_text = _render(tokenizer, full_msgs, False, source, i)
        kept.append(i)
        if full_text.startswith(prompt_text):
            prompts.append(prompt_text)
            rests.append(full_text[len(prompt_text) :])
        else:
            # Unusual template (the generation prompt is not a prefix of the rendered turn): mask the longest
            # common token prefix instead.
            fallback[len(prompts)] = full_text
            prompts.append(prompt_text)
            rests.append("")
    prompt_ids = _encode(tokenizer, prompts, add_special_tokens=False)
    rest_ids = _encode(tokenizer, rests, add_special_tokens=False)
    for k, full_text in fallback.items():
        full = _encode(tokenizer, [full_text], add_special_tokens=False)[0]
        n = _common_prefix(full, prompt_ids[k])
        prompt_ids[k], rest_ids[k] = list(full[:n]), list(full[n:])

    eos = tokenizer.eos_token_id
    examples, too_long = [], 0
    for p_ids, r_ids in zip(prompt_ids, rest_ids, strict=True):
        p_ids, r_ids = list(p_ids), list(r_ids)
        if eos is not None and eos in r_ids:
            # Keep the response through its end-of-turn EOS; what the template adds after it is never trained on.
            r_ids = r_ids[: len(r_ids) - r_ids[::-1].index(eos)]
        elif add_eos and eos is not None:
            r_ids.append(eos)
        ids = (p_ids + r_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:seq_len]
        if all(t == IGNORE_INDEX for t in labels):
            too_long += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if no_answer:
        log.warning(
            "data source %s: dropped %d records without an assistant turn in field %r",
            source.label(),
            no_answer,
            source.messages_field,
        )
    return examples, too_long


def tokenize_records(
    records: Sequence[Mapping],
    source: Union[DataSource, Mapping, str],
    tokenizer: Any,
    seq_len: int,
    add_eos: bool = True,
) -> list[dict]:
    """Tokenize already-loaded records of a source (see :func:`tokenize_source`)."""
    source = as_source(source)
    check_tokenizer(tokenizer, f"data source {source.label()}")
    if not is_int(seq_len) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if source.is_chat:
        examples, dropped = _tokenize_chat(records, source, tokenizer, seq_len, add_eos)
        why = f"no response token left within seq_len={seq_len} (prompt too long)"
    else:
        examples, dropped = _tokenize_plain(records, source, tokenizer, seq_len, add_eos)
        why = "fewer than 2 tokens"
    if dropped:
        log.warning(
            "data source %s: dropped %d of %d records with %s", source.label(), dropped, len(records), why
        )
    if not examples:
        raise DataError(
            f"data source {source.label()}: no trainable records after tokenization ({dropped} with {why})"
        )
    return examples


def tokenize_source(
    source: Union[DataSource, Mapping, str], tokenizer: Any, seq_len: int, add_eos: bool = True
) -> list[dict]:
    """Load and tokenize a data source.

    Args:
        source: the source (or a mapping of its fields, or a path).
        tokenizer: a Hugging Face tokenizer with a pad token (and a chat template for chat data).
        seq_len: maximum tokens per example; longer examples are truncated on the right.
        add_eos: append the EOS token to plain text, and to chat responses whose template does not end the turn
            with it.

    Returns:
        One ``{"input_ids": list[int], "labels": list[int]}`` per kept record; labels are -100 on prompt tokens.

    Raises:
        ConfigError: tokenizer without a pad token, chat data without a chat template, bad ``seq_len``.
        DataError: see :func:`~tar_lightning.data.sources.load_records`; nothing trainable left.
    """
    source = as_source(source)
    check_tokenizer(tokenizer, f"data source {source.label()}")
    return tokenize_records(load_records(source), source, tokenizer, seq_len, add_eos=add_eos)


class TokenPool:
    """Tokenized examples of one stream, packed into flat tensors plus offsets (cheap to pickle and index)."""

    def __init__(self, examples: Sequence[Mapping]):
        if not examples:
            raise DataError("an empty token pool cannot be batched")
        lengths = np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=len(examples))
        self.offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.lengths = lengths
        total = int(self.offsets[-1])
        self.input_ids = torch.from_numpy(
            np.fromiter(
                itertools.chain.from_iterable(e["input_ids"] for e in examples), dtype=np.int64, count=total
            )
        )
        self.labels = torch.from_numpy(
            np.fromiter(
                itertools.chain.from_iterable(e["labels"] for e in examples), dtype=np.int64, count=total
            )
        )

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of one example, unpadded."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.input_ids[lo:hi], self.labels[lo:hi]

    def collate(
        self, indices: Sequence[int], pad_id: int, length: Union[int, None] = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded ``[len(indices), L]`` batch; ``L`` is the longest example unless ``length`` is given."""
        lens = (
            self.lengths[np.asarray(indices, dtype=np.int64)] if len(indices) else np.zeros(0, dtype=np.int64)
        )
        width = int(length) if length is not None else int(lens.max(initial=1))
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, idx in enumerate(indices):
            x, y = self.example(int(idx))
            n = min(len(x), width)
            ids[row, :n] = x[:n]
            labels[row, :n] = y[:n]
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
