"""Held-out language-modelling metrics: token-weighted next-token cross-entropy and predictive entropy.

The red team tracks the held-out forget loss along every attack; this is the one function that measures it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from tar_lightning.common import is_int
from tar_lightning.data.sources import DataSource, as_source, load_records, source_text
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.losses import token_entropy

__all__ = ["heldout_metrics", "heldout_texts"]

IGNORE_INDEX = -100


def _positive_int(value: Any, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def heldout_texts(
    texts_or_source: Union[Sequence[str], DataSource, Mapping, str, os.PathLike],
    limit: Optional[int] = None,
    text_field: Optional[str] = None,
) -> list[str]:
    """The texts a held-out set stands for.

    Args:
        texts_or_source: a list of strings, or a data source (:class:`~tar_lightning.data.DataSource`, a mapping
            of its fields, or a path / hub id string) whose ``text_field`` holds plain text.
        limit: keep the first ``limit`` texts.
        text_field: for a bare path: the field holding the text (default ``"text"``).

    Raises:
        ConfigError: a chat source (prompt/response or messages), a bad ``limit``, or a list with non-strings.
        DataError: the source cannot be read (see :func:`~tar_lightning.data.load_records`).
    """
    if limit is not None:
        _positive_int(limit, "limit")
    if isinstance(texts_or_source, (list, tuple)):
        bad = [i for i, t in enumerate(texts_or_source) if not isinstance(t, str)]
        if bad:
            raise ConfigError(f"held-out texts must be strings; items {bad[:5]} are not")
        texts = list(texts_or_source)
    else:
        value: Any = texts_or_source
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str) and text_field is not None:
            value = {"path": value, "text_field": text_field}
        source = as_source(value, "held-out data")
        if source.is_chat:
            raise ConfigError(
                f"held-out data {source.label()}: heldout_metrics scores plain text; give a source with a "
                "text_field, not prompt/response or messages fields"
            )
        texts = [source_text(r, source, i) for i, r in enumerate(load_records(source))]
    return texts[:limit] if limit is not None else texts


def heldout_metrics(
    model: Any,
    tokenizer: Any,
    texts_or_source: Union[Sequence[str], DataSource, Mapping, str, os.PathLike],
    seq_len: int = 256,
    batch_size: int = 8,
    limit: Optional[int] = None,
    *,
    text_field: Optional[str] = None,
) -> dict:
    """Mean next-token cross-entropy and mean predictive entropy of ``model`` on a set of texts.

    Each text is encoded with the tokenizer's default special tokens and truncated to ``seq_len`` tokens (no
    packing, so every text is scored from its start); texts are batched in the given order and padded on the
    right. Both metrics are token-weighted over the whole set: the sum over every predicted token (position ``t``
    predicting token ``t+1`` of the same text, padding excluded) divided by their number, so the result does not
    depend on ``batch_size`` (up to float rounding). The entropy is measured at the same positions as the loss.
    Runs without gradients; the model's train/eval mode is restored afterwards. Deterministic.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        texts_or_source: a list of strings or a data source; see :func:`heldout_texts`.
        seq_len: tokens per text at most.
        batch_size: texts per forward pass.
        limit: score the first ``limit`` texts.
        text_field: the text field, when ``texts_or_source`` is a bare path.

    Returns:
        ``{"loss", "entropy", "perplexity", "tokens", "texts"}`` (nats; ``tokens`` = number of predicted tokens).

    Raises:
        ConfigError: bad ``seq_len``/``batch_size``/``limit``, or a chat source.
        DataError: the source cannot be read, or no text has two or more tokens.
    """
    _positive_int(seq_len, "seq_len")
    _positive_int(batch_size, "batch_size")
    texts = heldout_texts(texts_or_source, limit, text_field)
    if not texts:
        raise DataError("held-out data: no texts to score")
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device

    nll_sum = 0.0
    ent_sum = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                chunk = [list(e) for e in encoded[start : start + batch_size]]
                if max(len(e) for e in chunk) < 2:
                    continue
                width = max(len(e) for e in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, e in enumerate(chunk):
                    ids[b, : len(e)] = torch.tensor(e, dtype=torch.long)
                    mask[b, : len(e)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
                keep = targets != IGNORE_INDEX
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                ent = token_entropy(logits)[keep].sum()
                nll_sum += float(nll)
                ent_sum += float(ent)
                count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError(f"held-out data: none of the {len(texts)} texts has two or more tokens to score")
    loss = nll_sum / count
    return {
        "loss": loss,
        "entropy": ent_sum / count,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": count,
        "texts": len(texts),
    }
