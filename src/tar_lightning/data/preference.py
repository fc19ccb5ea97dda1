"""Preference data: (prompt, chosen, rejected) pairs for the DPO tamper-resistance loss of the refusal setting.

A :class:`PreferenceSource` reads pairs from one of three layouts:

``hh_rlhf``
    Anthropic HH-RLHF style records ``{"chosen": transcript, "rejected": transcript}`` where a transcript is
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the shared dialogue before the last ``Assistant:`` turn is the
    prompt (multi-turn prompts become a list of chat messages), the two last assistant turns are the responses.
``joined``
    Two prompt/response files (``path`` = chosen responses, ``rejected_path`` = rejected responses) joined on
    the prompt, e.g. a ``refusal_compliance_pairs`` folder: the ``*_baseline_completions.json`` of a
    refusal-trained model (chosen = refusal) and the ``*_ablation_completions.json`` of the same model with its
    refusal direction ablated (rejected = compliance) for the same prompts.
``pairs``
    One file or hub dataset with ``prompt``/``chosen``/``rejected`` fields (field names configurable).

Pairs are rendered with the tokenizer's chat template; prompt tokens are labelled -100. Prompts longer than
``max_prompt_len`` tokens keep their *end* (``truncation: keep_end``, the default) or are dropped
(``truncation: drop``); a response is then cut so prompt + response fit ``max_len``. Pairs with an empty
response, identical responses, or prompts that do not match between the two transcripts are dropped; every drop
and truncation is counted and logged, never silent.

Reference log-probabilities (the frozen starting model's summed response log-probs, needed by DPO) are computed
once by :func:`reference_logprobs` and cached on disk under a key that hashes the model's parameters, the token
ids and labels of every pair (hence the data, template and lengths); a later run with the same model and data
reads them back instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from tar_lightning.checkpoint import atomic_save
from tar_lightning.common import is_int, model_fingerprint
from tar_lightning.data.sources import DataSource, as_source, load_records, select_range
from tar_lightning.data.tokenize import IGNORE_INDEX, TokenPool, check_tokenizer
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.losses.dpo import sequence_logprobs

__all__ = [
    "PREFERENCE_FORMATS",
    "PreferencePool",
    "PreferenceSource",
    "as_stream_source",
    "load_pairs",
    "model_fingerprint",
    "parse_hh_transcript",
    "preference_pool",
    "reference_logprobs",
    "tokenize_pairs",
]

log = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("auto", "hh_rlhf", "joined", "pairs")
EMIT = ("pairs", "chosen", "rejected")
TRUNCATION = ("keep_end", "drop")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
DEFAULT_CACHE_DIR = "~/.cache/tar_lightning/reference_logprobs"


@dataclass
class PreferenceSource:
    """Where preference pairs come from and how they become tokens.

    Use it as a :class:`~tar_lightning.data.TARDataModule` stream by giving the stream ``kind: preference``.

    Attributes:
        path: a hub dataset id, a local file or folder (anything :class:`~tar_lightning.data.DataSource` reads).
            For ``joined``: the file of *chosen* (e.g. refusal) responses.
        kind: always ``"preference"`` (marks the stream as preference data in recipes).
        format: ``hh_rlhf``, ``joined``, ``pairs`` or ``auto`` (``joined`` when ``rejected_path`` is set,
            ``hh_rlhf`` when the records have chosen/rejected but no prompt field, else ``pairs``).
        rejected_path: ``joined`` only: the file of *rejected* (e.g. harmful) responses.
        split: hub split.
        name: hub config name.
        prompt_field: field of the prompt (``pairs``, ``joined``).
        chosen_field: field of the chosen response (``pairs``) or transcript (``hh_rlhf``).
        rejected_field: field of the rejected response or transcript.
        response_field: ``joined`` only: field of the response in both files.
        trim_at: cut every response at the first occurrence of any of these strings (e.g. ``"assistant\\n\\n"``
            for completions that were not stopped at the end of turn).
        system_prompt: system message put before every prompt.
        select: ``"start:stop"`` slice of the pairs (after joining and dropping), as DataSource's ``select``.
        limit: keep at most this many pairs.
        max_prompt_len: most prompt tokens (after the chat template); longer prompts are truncated/dropped.
            ``None``: half of the total length.
        max_len: most tokens of prompt + response; responses are cut on the right to fit. ``None``: the data
            module's ``seq_len``.
        truncation: ``keep_end`` keeps the end of an over-long prompt; ``drop`` drops the pair.
        emit: ``pairs`` (chosen and rejected, with reference log-probs: the DPO stream), ``rejected`` or
            ``chosen`` (plain SFT examples of one side, e.g. the adversary's harmful completions).
        reference: compute reference log-probs (``emit: pairs`` only).
        cache_dir: where reference log-probs are cached (default ``$TAR_LIGHTNING_CACHE/reference_logprobs`` or
            ``~/.cache/tar_lightning/reference_logprobs``); ``None`` with ``cache: false`` keeps them in memory.
        cache: write/read the on-disk cache.
        ref_batch_size: batch size of the reference forward passes.
    """

    path: str
    kind: str = "preference"
    format: str = "auto"
    rejected_path: Optional[str] = None
    split: str = "train"
    name: Optional[str] = None
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    response_field: str = "response"
    trim_at: list = field(default_factory=list)
    system_prompt: Optional[str] = None
    select: Optional[str] = None
    limit: Optional[int] = None
    max_prompt_len: Optional[int] = None
    max_len: Optional[int] = None
    truncation: str = "keep_end"
    emit: str = "pairs"
    reference: bool = True
    cache_dir: Optional[str] = None
    cache: bool = True
    ref_batch_size: int = 8

    def __post_init__(self) -> None:
        where = f"preference source {self.path!r}"
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"preference source: 'path' must be a non-empty string, got {self.path!r}")
        if self.kind != "preference":
            raise ConfigError(f"{where}: 'kind' must be 'preference', got {self.kind!r}")
        if self.format not in PREFERENCE_FORMATS:
            raise ConfigError(f"{where}: 'format' must be one of {list(PREFERENCE_FORMATS)}, got {self.format!r}")
        if self.format == "joined" and not self.rejected_path:
            raise ConfigError(f"{where}: format 'joined' needs 'rejected_path' (the file of rejected responses)")
        if self.rejected_path is not None and self.format not in ("auto", "joined"):
            raise ConfigError(f"{where}: 'rejected_path' is only used by format 'joined', not {self.format!r}")
        if self.emit not in EMIT:
            raise ConfigError(f"{where}: 'emit' must be one of {list(EMIT)}, got {self.emit!r}")
        if self.truncation not in TRUNCATION:
            raise ConfigError(f"{where}: 'truncation' must be one of {list(TRUNCATION)}, got {self.truncation!r}")
        if isinstance(self.trim_at, str):
            self.trim_at = [self.trim_at]
        if not isinstance(self.trim_at, (list, tuple)) or not all(isinstance(s, str) and s for s in self.trim_at):
            raise ConfigError(f"{where}: 'trim_at' must be a list of non-empty strings, got {self.trim_at!r}")
        self.trim_at = list(self.trim_at)
        for key, minimum in (("max_prompt_len", 1), ("ref_batch_size", 1)):
            value = getattr(self, key)
            if value is None and key == "max_prompt_len":
                continue
            if not is_int(value) or value < minimum:
                raise ConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
        if self.max_len is not None:
            if not is_int(self.max_len) or self.max_len < 2:
                raise ConfigError(f"{where}: 'max_len' must be an integer >= 2 or null, got {self.max_len!r}")
            if self.max_prompt_len is not None and self.max_prompt_len >= self.max_len:
                raise ConfigError(
                    f"{where}: 'max_prompt_len'={self.max_prompt_len} must be < 'max_len'={self.max_len}, "
                    "otherwise no response token fits"
                )
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            raise ConfigError(f"{where}: 'limit' must be a positive integer or null, got {self.limit!r}")
        if self.select is not None:
            select_range(self.select, 1, self.path)  # validates the syntax

    def label(self) -> str:
        parts = [repr(self.path)]
        if self.rejected_path:
            parts.append(f"rejected_path={self.rejected_path!r}")
        if self.select:
            parts.append(f"select={self.select!r}")
        return "preference " + " ".join(parts)

    @property
    def is_chat(self) -> bool:
        return True


def as_stream_source(value: Any, what: str) -> Union[DataSource, PreferenceSource]:
    """A :class:`PreferenceSource` for mappings with ``kind: preference``, else :func:`as_source`'s result."""
    if isinstance(value, PreferenceSource):
        return value
    if isinstance(value, Mapping) and value.get("kind") == "preference":
        known = {f.name for f in dataclasses.fields(PreferenceSource)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{what}: unknown keys {unknown} for a preference stream; expected some of {sorted(known)}")
        if "path" not in value:
            raise ConfigError(f"{what}: missing required key 'path' (got keys {sorted(value)})")
        return PreferenceSource(**dict(value))
    return as_source(value, what)


# ---------------------------------------------------------------------------------------------- reading
def parse_hh_transcript(text: str) -> list[dict]:
    """Split an HH-RLHF transcript into ``[{"role": "user"|"assistant", "content"}]`` messages.

    Raises:
        ValueError: the text has no ``Human:``/``Assistant:`` turn markers.
    """
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3:
        raise ValueError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def _trim(text: str, marks: Sequence[str]) -> str:
    for mark in marks:
        at = text.find(mark)
        if at >= 0:
            text = text[:at]
    return text.strip()


def _read(source: PreferenceSource, path: str, fields: Sequence[str]) -> list[dict]:
    """All records of ``path`` (hub or local) that have ``fields``; missing fields raise DataError."""
    ds = DataSource(path=path, split=source.split, name=source.name, text_field=fields[0], min_chars=0)
    records = load_records(ds)
    missing = [f for f in fields[1:] if records and f not in records[0]]
    if missing:
        raise DataError(
            f"{source.label()}: {path} has no field(s) {missing}; available fields: {sorted(records[0])}"
        )
    return records


def _text(value: Any, key: str, source: PreferenceSource, index: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{source.label()}: record {index}: field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def load_pairs(source: PreferenceSource) -> list[dict]:
    """Read the pairs of a source: ``[{"prompt": [messages], "chosen": str, "rejected": str}]``.

    Pairs with an empty response, identical responses, or (HH-RLHF) transcripts whose dialogues differ before
    the last assistant turn are dropped; the counts are logged as a warning.

    Raises:
        DataError: unreadable source, missing fields, no pair left.
    """
    fmt = source.format
    if fmt == "auto":
        if source.rejected_path:
            fmt = "joined"
        else:
            probe = load_records(
                DataSource(path=source.path, split=source.split, name=source.name,
                           text_field=source.chosen_field, min_chars=0)
            )
            fmt = "pairs" if probe and source.prompt_field in probe[0] else "hh_rlhf"
    raw: list[tuple[list[dict], str, str]] = []
    dropped: dict[str, int] = {}

    early_drops = [0]  # pairs dropped before they reach ``raw`` (so the total read is known)

    def drop(why: str, early: bool = True) -> None:
        dropped[why] = dropped.get(why, 0) + 1
        early_drops[0] += int(early)

    if fmt == "hh_rlhf":
        for i, r in enumerate(_read(source, source.path, [source.chosen_field, source.rejected_field])):
            chosen_t = _text(r.get(source.chosen_field), source.chosen_field, source, i)
            rejected_t = _text(r.get(source.rejected_field), source.rejected_field, source, i)
            try:
                chosen_m, rejected_m = parse_hh_transcript(chosen_t), parse_hh_transcript(rejected_t)
            except ValueError:
                drop("not an HH-RLHF transcript")
                continue
            if chosen_m[-1]["role"] != "assistant" or rejected_m[-1]["role"] != "assistant":
                drop("no final assistant turn")
                continue
            if chosen_m[:-1] != rejected_m[:-1]:
                drop("chosen and rejected dialogues differ before the last turn")
                continue
            raw.append((chosen_m[:-1], chosen_m[-1]["content"], rejected_m[-1]["content"]))
    elif fmt == "joined":
        assert source.rejected_path is not None
        fields = [source.prompt_field, source.response_field]
        chosen_recs = _read(source, source.path, fields)
        rejected_recs = _read(source, source.rejected_path, fields)
        by_prompt: dict[str, str] = {}
        for i, r in enumerate(rejected_recs):
            prompt = _text(r.get(source.prompt_field), source.prompt_field, source, i)
            by_prompt.setdefault(prompt, _text(r.get(source.response_field), source.response_field, source, i))
        for i, r in enumerate(chosen_recs):
            prompt = _text(r.get(source.prompt_field), source.prompt_field, source, i)
            if prompt not in by_prompt:
                drop("prompt not found in rejected_path")
                continue
            response = _text(r.get(source.response_field), source.response_field, source, i)
            raw.append(([{"role": "user", "content": prompt}], response, by_prompt[prompt]))
    else:
        fields = [source.prompt_field, source.chosen_field, source.rejected_field]
        for i, r in enumerate(_read(source, source.path, fields)):
            prompt = _text(r.get(source.prompt_field), source.prompt_field, source, i)
            raw.append((
                [{"role": "user", "content": prompt}],
                _text(r.get(source.chosen_field), source.chosen_field, source, i),
                _text(r.get(source.rejected_field), source.rejected_field, source, i),
            ))

    pairs = []
    for prompt, chosen, rejected in raw:
        chosen, rejected = _trim(chosen, source.trim_at), _trim(rejected, source.trim_at)
        if not prompt or not any(m["content"].strip() for m in prompt):
            drop("empty prompt", early=False)
        elif not chosen or not rejected:
            drop("empty chosen or rejected response", early=False)
        elif chosen == rejected:
            drop("identical chosen and rejected responses", early=False)
        else:
            if source.system_prompt is not None and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": source.system_prompt}, *prompt]
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    total = len(raw) + early_drops[0]
    if dropped:
        log.warning(
            "%s: dropped %d of %d pairs (%s)", source.label(), sum(dropped.values()), total,
            ", ".join(f"{n} {why}" for why, n in dropped.items()),
        )
    keep = select_range(source.select, len(pairs), source.path)
    pairs = [pairs[i] for i in keep]
    if source.limit is not None:
        pairs = pairs[: source.limit]
    if not pairs:
        raise DataError(
            f"{source.label()}: no preference pair left (read {total}, dropped "
            f"{dict(dropped) or 0}, select={source.select!r})"
        )
    return pairs


# ---------------------------------------------------------------------------------------------- tokens
def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, source: PreferenceSource) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - any template failure is a data problem of this source
        raise DataError(
            f"{source.label()}: the tokenizer's chat template cannot render messages "
            f"{[m['role'] for m in messages]} ({type(e).__name__}: {e})"
        ) from e


def _response_ids(tokenizer: Any, prompt_text: str, prompt_ids: list[int], messages: list[dict],
                  source: PreferenceSource) -> list[int]:
    full_text = _render(tokenizer, messages, False, source)
    if full_text.startswith(prompt_text):
        ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    else:  # the generation prompt is not a prefix of the rendered turn: split at the common token prefix
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(full), len(prompt_ids)) and full[n] == prompt_ids[n]:
            n += 1
        ids = full[n:]
    ids = list(ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: len(ids) - ids[::-1].index(eos)]  # through the end-of-turn EOS; nothing after it
    elif eos is not None:
        ids.append(eos)
    return ids


def tokenize_pairs(pairs: Sequence[Mapping], source: PreferenceSource, tokenizer: Any, seq_len: int) -> dict:
    """Tokenize pairs: ``{"chosen": [examples], "rejected": [examples]}``, examples as TokenPool takes them.

    Each example is prompt + response ids with the prompt labelled -100. Prompts longer than
    ``source.max_prompt_len`` keep their last tokens (``keep_end``) or drop the pair (``drop``); responses are
    cut on the right to fit ``max_len`` (default ``seq_len``). Counts are logged.

    Raises:
        ConfigError: no chat template, or ``max_prompt_len`` >= the total length.
        DataError: no pair left.
    """
    check_tokenizer(tokenizer, source.label())
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{source.label()}: preference data needs a tokenizer with a chat template, and "
                          f"{type(tokenizer).__name__} has none")
    max_len = source.max_len if source.max_len is not None else seq_len
    max_prompt = source.max_prompt_len if source.max_prompt_len is not None else max_len // 2
    if max_prompt >= max_len:
        raise ConfigError(
            f"{source.label()}: max_prompt_len={max_prompt} must be < the total length {max_len} "
            "(max_len, or the data module's seq_len)"
        )
    out: dict[str, list] = {"chosen": [], "rejected": []}
    long_prompts = cut_responses = 0
    dropped = 0
    for pair in pairs:
        prompt_text = _render(tokenizer, list(pair["prompt"]), True, source)
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        responses = {
            side: _response_ids(tokenizer, prompt_text, prompt_ids,
                                [*pair["prompt"], {"role": "assistant", "content": pair[side]}], source)
            for side in ("chosen", "rejected")
        }
        if len(prompt_ids) > max_prompt:
            long_prompts += 1
            if source.truncation == "drop":
                dropped += 1
                continue
            prompt_ids = prompt_ids[-max_prompt:]
        room = max_len - len(prompt_ids)
        for side, ids in responses.items():
            if len(ids) > room:
                cut_responses += 1
                ids = ids[:room]
            out[side].append({"input_ids": prompt_ids + ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + ids})
    if long_prompts:
        action = "dropped" if source.truncation == "drop" else f"truncated to their last {max_prompt} tokens"
        log.warning("%s: %d of %d pairs have a prompt longer than max_prompt_len=%d tokens: %s",
                    source.label(), long_prompts, len(pairs), max_prompt, action)
    if cut_responses:
        log.warning("%s: %d responses cut on the right to fit max_len=%d tokens", source.label(), cut_responses,
                    max_len)
    if not out["chosen"]:
        raise DataError(f"{source.label()}: no pair left after tokenization ({dropped} dropped: prompt longer "
                        f"than max_prompt_len={max_prompt})")
    return out


# ---------------------------------------------------------------------------------------------- reference
def _data_hash(pool_c: TokenPool, pool_r: TokenPool) -> str:
    h = hashlib.sha256()
    for pool in (pool_c, pool_r):
        for t in (pool.input_ids, pool.labels, torch.from_numpy(pool.offsets)):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


def _cache_root(source: PreferenceSource) -> Path:
    if source.cache_dir is not None:
        return Path(os.path.expanduser(source.cache_dir))
    env = os.environ.get("TAR_LIGHTNING_CACHE")
    if env:
        return Path(os.path.expanduser(env)) / "reference_logprobs"
    return Path(os.path.expanduser(DEFAULT_CACHE_DIR))


@torch.no_grad()
def _pool_logprobs(model: nn.Module, pool: TokenPool, pad_id: int, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(pool), batch_size):
        batch = pool.collate(list(range(lo, min(len(pool), lo + batch_size))), pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        out.append(sequence_logprobs(logits, batch["labels"].to(device)).float().cpu())
    return torch.cat(out)


def reference_logprobs(
    model: nn.Module, chosen: TokenPool, rejected: TokenPool, pad_id: int, source: PreferenceSource
) -> tuple[torch.Tensor, torch.Tensor, Optional[Path]]:
    """Summed response log-probs of every chosen and rejected example under ``model`` (eval mode, no grad).

    With ``source.cache`` the result is stored in ``<cache_dir>/<model hash>-<data hash>.pt`` and read back on
    later calls with the same model weights and token data.

    Returns:
        ``(chosen_logps [N], rejected_logps [N], cache file or None)``, fp32 on the CPU.
    """
    path = None
    if source.cache:
        path = _cache_root(source) / f"{model_fingerprint(model)}-{_data_hash(chosen, rejected)}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved["chosen"].shape == (len(chosen),) and saved["rejected"].shape == (len(rejected),):
                    log.info("%s: reference log-probs read from cache %s", source.label(), path)
                    return saved["chosen"], saved["rejected"], path
            except Exception as e:  # noqa: BLE001 - a corrupt cache file is recomputed, loudly
                log.warning("%s: ignoring unreadable reference cache %s (%s)", source.label(), path, e)
    was_training = model.training
    model.eval()
    try:
        c = _pool_logprobs(model, chosen, pad_id, source.ref_batch_size)
        r = _pool_logprobs(model, rejected, pad_id, source.ref_batch_size)
    finally:
        model.train(was_training)
    if path is not None:
        atomic_save({"chosen": c, "rejected": r}, path)
        log.info("%s: reference log-probs of %d pairs computed and cached in %s", source.label(), len(c), path)
    return c, r, path


class PreferencePool:
    """Tokenized pairs plus their reference log-probs; batches stack the chosen rows over the rejected rows.

    :meth:`bundle` returns ``{"input_ids", "attention_mask", "labels": [n, 2b, L], "ref_logps": [n, 2b]}``:
    rows ``0..b-1`` of a micro-batch are the chosen responses, rows ``b..2b-1`` the rejected responses of the same
    pairs, so one forward pass scores both (``TARModule`` with ``tr_loss: dpo`` reads this layout).
    """

    def __init__(self, chosen: TokenPool, rejected: TokenPool, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
        if len(chosen) != len(rejected) or ref_chosen.shape != (len(chosen),) or ref_rejected.shape != (len(chosen),):
            raise DataError("PreferencePool: chosen, rejected and reference log-probs must have one entry per pair")
        self.chosen, self.rejected = chosen, rejected
        self.ref_chosen, self.ref_rejected = ref_chosen.float(), ref_rejected.float()
        self.lengths = np.maximum(chosen.lengths, rejected.lengths)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens

    def collate(self, indices: Sequence[int], pad_id: int, length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``[2·len(indices), L]``: the chosen rows, then the rejected rows; ``ref_logps`` ``[2·len(indices)]``."""
        width = length if length is not None else int(self.lengths[np.asarray(indices, dtype=np.int64)].max(initial=1))
        c = self.chosen.collate(indices, pad_id, width)
        r = self.rejected.collate(indices, pad_id, width)
        out = {k: torch.cat([c[k], r[k]]) for k in c}
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out["ref_logps"] = torch.cat([self.ref_chosen[idx], self.ref_rejected[idx]])
        return out

    def bundle(self, idx: np.ndarray, pad_id: int, width: int) -> dict[str, torch.Tensor]:
        """Micro-batches of pool indices ``idx [n, b]`` as ``{key: [n, 2b, ...]}`` (see the class docstring)."""
        parts = [self.collate(row.tolist(), pad_id, width) for row in np.asarray(idx)]
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}


def preference_pool(
    source: PreferenceSource, tokenizer: Any, seq_len: int, model: Optional[nn.Module] = None
) -> Union[PreferencePool, TokenPool]:
    """Read, tokenize and (for ``emit: pairs``) score a preference source.

    ``emit: chosen``/``rejected`` return a plain :class:`TokenPool` of that side's SFT examples (prompt masked).

    Raises:
        ConfigError: ``emit: pairs`` with ``reference: true`` and no model to compute reference log-probs with.
    """
    tokens = tokenize_pairs(load_pairs(source), source, tokenizer, seq_len)
    log.info("%s: %d pairs", source.label(), len(tokens["chosen"]))
    if source.emit != "pairs":
        return TokenPool(tokens[source.emit])
    chosen, rejected = TokenPool(tokens["chosen"]), TokenPool(tokens["rejected"])
    if not source.reference:
        zeros = torch.zeros(len(chosen))
        return PreferencePool(chosen, rejected, zeros, zeros.clone())
    if model is None:
        raise ConfigError(f"{source.label()}: reference log-probs need the starting model; attach the data module "
                          "to a LightningModule with a 'model' attribute (or set reference: false)")
    ref_c, ref_r, _ = reference_logprobs(model, chosen, rejected, int(tokenizer.pad_token_id), source)
    return PreferencePool(chosen, rejected, ref_c, ref_r)
