"""Predictive entropy and the max-entropy tamper-resistance loss (the paper's weaponization TR loss)."""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from tar_lightning.errors import ConfigError
from tar_lightning.losses._common import (
    IGNORE_INDEX,
    check_batch_seq,
    check_logits,
    compute_dtype,
    masked_mean,
)

__all__ = [
    "ENTROPY_POSITIONS",
    "CandidateTokens",
    "check_token_ids",
    "entropy_position_mask",
    "max_entropy_loss",
    "mean_entropy",
    "token_entropy",
    "token_ids_problem",
]

ENTROPY_POSITIONS = ("attention", "labels", "all")


def _id_list(ids: object) -> tuple[list[int] | None, str | None]:
    """``(ids as Python ints, None)``, or ``(None, what is wrong)`` (see :func:`token_ids_problem`)."""
    if isinstance(ids, (Tensor, np.ndarray)):
        kind = "tensor" if isinstance(ids, Tensor) else "array"
        integer = (not ids.dtype.is_floating_point and not ids.dtype.is_complex and ids.dtype != torch.bool
                   if isinstance(ids, Tensor) else ids.dtype.kind in "iu")
        if ids.ndim != 1 or not integer:
            return None, f"expected a 1-D integer {kind} of token ids, got a {ids.ndim}-D {ids.dtype} {kind}"
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        return None, f"expected a list of token ids, got {type(ids).__name__}"
    wrong = [i for i in ids if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral) or i < 0]
    if wrong:
        shown = ", ".join(map(repr, wrong[:10])) + (f", ... ({len(wrong)} in all)" if len(wrong) > 10 else "")
        return None, f"expected token ids (integers >= 0), got {shown}"
    ids = [int(i) for i in ids]
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        return None, f"expected each token id once; repeated: {repeated}"
    if len(ids) < 2:
        return None, f"expected at least 2 token ids (the entropy over one token is always 0), got {len(ids)}"
    return ids, None


def token_ids_problem(ids: object) -> str | None:
    """What is wrong with ``ids`` as candidate token ids for the restricted entropy, or ``None`` if nothing is.

    Candidates are a sequence (list, tuple, range) of integers, or a 1-D integer tensor or numpy array: at least 2
    ids, each ``>= 0`` and given once (the entropy over a single token is always 0, and a repeated id would count
    twice in the renormalisation).
    """
    return _id_list(ids)[1]


class CandidateTokens:
    """Candidate token ids for the restricted entropy, checked once, with their index tensor kept per device.

    Passing one of these as ``tokens=`` to :func:`max_entropy_loss` instead of a list skips the per-call checks
    and the per-call host-to-device copy of the index (a blocking copy on CUDA, i.e. a synchronisation per loss);
    :class:`~tar_lightning.TARModule` builds one from ``TARConfig.entropy_tokens``. Copies and pickles leave the
    cached tensors behind (they are rebuilt on first use).

    Args:
        ids: the token ids; see :func:`token_ids_problem`.
        name: what errors name, e.g. ``"TARConfig.entropy_tokens"``.

    Raises:
        ConfigError: ``ids`` is not a valid candidate list, naming ``name`` and the problem.
    """

    def __init__(self, ids: Tensor | Sequence[int], name: str = "tokens") -> None:
        checked, problem = _id_list(ids)
        if problem is not None:
            raise ConfigError(f"{name}: {problem}")
        self.ids: tuple[int, ...] = tuple(checked)
        self.name = name
        self._index: dict[torch.device, Tensor] = {}

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ConfigError naming every id outside the ``vocab_size`` logits (no tensor work: ints only)."""
        if max(self.ids) >= vocab_size:
            check_token_ids(self.ids, vocab_size, self.name)

    def index(self, device: torch.device | str) -> Tensor:
        """The ids as a ``long`` tensor on ``device``, built on the first call for that device.

        Built outside inference mode even when called inside it (a Lightning validation loop), so the cached
        tensor can later take part in a training step's autograd graph.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:<current>" are one device
            device = torch.device("cuda", torch.cuda.current_device())
        index = self._index.get(device)
        if index is None:
            with torch.inference_mode(False):
                index = self._index[device] = torch.tensor(self.ids, dtype=torch.long, device=device)
        return index

    def __getstate__(self) -> dict:
        return {"ids": self.ids, "name": self.name, "_index": {}}  # no device tensors in copies and pickles

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"CandidateTokens({list(self.ids)}, name={self.name!r})"


def _candidates(tokens: CandidateTokens | Tensor | Sequence[int] | None) -> CandidateTokens | None:
    return tokens if tokens is None or isinstance(tokens, CandidateTokens) else CandidateTokens(tokens)


class _TokenEntropy(torch.autograd.Function):
    """H(softmax(x)) over the last dim, saving only the log-probabilities for backward.

    Plain autograd of ``-(p * log p).sum()`` keeps both ``p`` and ``log p`` (two ``[B, T, V]`` fp32 tensors,
    about 1 GB each at batch 8 x 256 tokens x 128k vocabulary) alive until backward. The analytic gradient
    ``dH/dx_j = -p_j (log p_j + H)`` needs only ``log p``, so this saves half of that memory.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        log_probs = F.log_softmax(logits, dim=-1, dtype=compute_dtype(logits))
        plogp = log_probs.exp().mul_(log_probs)
        entropy = plogp.sum(dim=-1).neg_()
        del plogp
        ctx.save_for_backward(log_probs, entropy)
        ctx.input_dtype = logits.dtype
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor) -> Tensor:
        log_probs, entropy = ctx.saved_tensors
        grad = log_probs + entropy.unsqueeze(-1)
        grad.mul_(log_probs.exp()).mul_(grad_entropy.to(grad.dtype).unsqueeze(-1).neg())
        return grad.to(ctx.input_dtype)


def token_entropy(logits: Tensor) -> Tensor:
    """Predictive entropy of every position, ``H = -sum_v p_v log p_v`` with ``p = softmax(logits)``, in nats.

    Differentiable once (first-order, as TAR needs); a second (double) backward raises.

    Args:
        logits: ``[B, T, V]`` model outputs (fp32 or bf16).

    Returns:
        ``[B, T]`` entropies in fp32 (fp64 for fp64 input).

    Raises:
        ConfigError: ``logits`` is not 3-D.
    """
    check_logits(logits)
    return _TokenEntropy.apply(logits)


def entropy_position_mask(
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    positions: str = "attention",
    shape: Sequence[int] | None = None,
    tokens: CandidateTokens | Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Which positions' predictive distributions count in the entropy loss.

    Args:
        attention_mask: ``[B, T]`` of 0/1. With ``positions="attention"``, ``None`` means "no padding" (the
            Hugging Face convention) and selects every position of ``shape``.
        labels: ``[B, T]`` token ids, ``-100`` where ignored; needed for ``positions="labels"``.
        positions: ``"attention"`` (default): positions with ``attention_mask == 1``, i.e. not padding.
            ``"labels"``: positions ``t`` whose next token is labelled, ``labels[:, t + 1] != -100`` (the last
            position is never selected); restricts the loss to, e.g., the answer tokens of a fact.
            ``"all"``: every position including padding (the reference implementation's behaviour).
        shape: ``(B, T)``; required when it cannot be taken from ``attention_mask`` or ``labels``, and checked
            against them when given.
        tokens: candidate token ids (see :func:`max_entropy_loss`). When given, only the positions above whose
            labelled next token is one of them are kept (``labels[:, t + 1]`` in ``tokens``; never the last
            position), so ``labels`` is needed.

    Returns:
        A ``[B, T]`` bool tensor, on ``labels``' device when ``tokens`` is given.

    Raises:
        ConfigError: ``positions`` is not one of ``"attention"``, ``"labels"``, ``"all"``; ``labels`` is None
            for ``"labels"`` or with ``tokens``; ``tokens`` is not a valid candidate list (see
            :func:`token_ids_problem`); the shape cannot be determined; or the tensors' shapes disagree.
    """
    if not isinstance(positions, str) or positions not in ENTROPY_POSITIONS:
        raise ConfigError(f"positions must be one of {list(ENTROPY_POSITIONS)}, got {positions!r}")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ConfigError(f"shape must be (batch, seq), got {shape}")
    else:
        known = attention_mask if attention_mask is not None else labels
        shape = tuple(known.shape) if known is not None else None
    if shape is not None:
        check_batch_seq(attention_mask, "attention_mask", shape)
        check_batch_seq(labels, "labels", shape)

    tokens = _candidates(tokens)
    mask = _position_mask(attention_mask, labels, positions, shape)
    if tokens is None:
        return mask
    if labels is None:
        raise ConfigError("tokens restrict the positions to those whose labelled next token is a candidate: they "
                          "need labels, got labels=None")
    mask = mask.to(labels.device)
    mask[:, :-1] &= torch.isin(labels[:, 1:], tokens.index(labels.device))
    mask[:, -1] = False
    return mask


def _position_mask(attention_mask, labels, positions: str, shape) -> Tensor:
    """:func:`entropy_position_mask` without the ``tokens`` restriction (arguments already checked)."""
    if positions == "labels":
        if labels is None:
            raise ConfigError('positions="labels" needs labels, got labels=None')
        mask = torch.zeros(shape, dtype=torch.bool, device=labels.device)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return mask
    if positions == "attention" and attention_mask is not None:
        return attention_mask != 0
    if shape is None:
        raise ConfigError(
            f'positions="{positions}" without attention_mask needs shape=(batch, seq), got shape=None'
        )
    device = attention_mask.device if attention_mask is not None else None
    device = labels.device if labels is not None else device
    return torch.ones(shape, dtype=torch.bool, device=device)


def check_token_ids(ids: Sequence[int], vocab_size: int, name: str = "tokens") -> None:
    """Checks that every candidate token id indexes the model's logits.

    Args:
        ids: the token ids.
        vocab_size: the logits' last dimension (the output embedding's rows).
        name: what the error names, e.g. ``"TARConfig.entropy_tokens"``.

    Raises:
        ConfigError: naming every id outside ``0 .. vocab_size - 1``.
    """
    bad = [int(i) for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ConfigError(
            f"{name}: token {'ids' if len(bad) > 1 else 'id'} {', '.join(map(str, bad))} "
            f"{'are' if len(bad) > 1 else 'is'} not in the model's vocabulary "
            f"(its logits have {vocab_size} entries, ids 0..{vocab_size - 1}); were the ids taken with another "
            "tokenizer?"
        )


def max_entropy_loss(
    logits: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    positions: str = "attention",
    tokens: CandidateTokens | Tensor | Sequence[int] | None = None,
) -> Tensor:
    """The max-entropy TR loss: minus the mean predictive entropy over the selected positions.

    Minimising it drives the predictive distributions toward uniform: over the whole vocabulary, or, with
    ``tokens``, over those candidates only.

    Args:
        logits: ``[B, T, V]`` model outputs (fp32 or bf16).
        attention_mask: ``[B, T]`` of 0/1; ``None`` means no padding.
        labels: ``[B, T]`` with ``-100`` where ignored; needed for ``positions="labels"`` and with ``tokens``.
        positions: ``"attention"``, ``"labels"`` or ``"all"``; see :func:`entropy_position_mask`.
        tokens: candidate token ids (e.g. the first tokens of the possible answers), or ``None``. When given,
            the entropy is that of ``softmax(logits[..., tokens])`` (at most ``log(len(tokens))``), taken only at
            the selected positions whose labelled next token is a candidate. Meant for labels that mark only the
            answer: with labels over the whole text, every position before any occurrence of a candidate token
            counts. A list or tensor is checked (and copied to the device) on every call; pass a
            :class:`CandidateTokens` to do that once.

    Returns:
        A 0-dim fp32 tensor; 0 (graph kept) when no position is selected.

    Raises:
        ConfigError: bad ``positions``; missing ``labels`` for ``"labels"`` or with ``tokens``; ``tokens`` not a
            valid candidate list (see :func:`token_ids_problem`) or an id outside the logits' vocabulary;
            mismatched shapes.
    """
    check_logits(logits)
    tokens = _candidates(tokens)
    if tokens is not None:
        tokens.check_vocab(logits.shape[-1])
        logits = logits.index_select(-1, tokens.index(logits.device))
    mask = entropy_position_mask(attention_mask, labels, positions, shape=logits.shape[:2], tokens=tokens)
    mask = mask.to(logits.device)
    return masked_mean(token_entropy(logits), mask).neg()


def mean_entropy(
    logits: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    positions: str = "attention",
    tokens: CandidateTokens | Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Mean predictive entropy over the selected positions, for logging.

    Computed without autograd, so it builds no graph and holds no activations; use :func:`max_entropy_loss`
    for a differentiable value.

    Args:
        logits: ``[B, T, V]`` model outputs (fp32 or bf16).
        attention_mask: ``[B, T]`` of 0/1; ``None`` means no padding.
        labels: ``[B, T]`` with ``-100`` where ignored; needed for ``positions="labels"`` and with ``tokens``.
        positions: ``"attention"``, ``"labels"`` or ``"all"``; see :func:`entropy_position_mask`.
        tokens: candidate token ids, or ``None``; see :func:`max_entropy_loss`.

    Returns:
        A 0-dim fp32 tensor without grad, in nats; 0 when no position is selected.

    Raises:
        ConfigError: as :func:`max_entropy_loss`.
    """
    with torch.no_grad():
        return max_entropy_loss(logits.detach(), attention_mask, labels, positions, tokens).neg()
