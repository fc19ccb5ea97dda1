"""The min-posterior unlearning loss (the TAR paper's "Min Posterior" stage-1 baseline): drive the probability of
every true next token of forget text toward 0."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tar_lightning.common import is_number
from tar_lightning.errors import ConfigError
from tar_lightning.losses._common import IGNORE_INDEX, masked_mean
from tar_lightning.losses.ce import shifted_log_probs

__all__ = ["MIN_POSTERIOR_THRESHOLD", "THRESHOLD_EXPECTED", "is_threshold", "min_posterior_loss"]

#: The reference implementation's threshold on ``log p``: a true next token already this unlikely adds nothing.
MIN_POSTERIOR_THRESHOLD = -15.0


#: What :func:`min_posterior_loss` and the configs that set its threshold expect (errors quote it).
THRESHOLD_EXPECTED = "a finite number <= 0 (a log-probability), or null/None for no threshold (not -inf)"


def is_threshold(value: object) -> bool:
    """Whether ``value`` is a valid Min-Posterior threshold: ``None`` or a finite number <= 0.

    An infinity is refused rather than read as "no threshold": it would be written into JSON records as the
    non-standard ``-Infinity``.
    """
    return value is None or (is_number(value) and value <= 0)


def min_posterior_loss(logits: Tensor, labels: Tensor,
                       threshold: float | None = MIN_POSTERIOR_THRESHOLD) -> Tensor:
    """Mean over the labelled positions of ``−log(1 − p(y_{t+1} | x_≤t))``, minimised as ``p → 0``.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``-100`` are ignored. A position whose
    ``log p`` is already below ``threshold`` adds 0 (and no gradient) but still counts in the mean, as in the
    reference implementation.

    ``log(1 − p)`` is computed in fp32 (fp64 for fp64 input) from ``log p`` as ``log1p(−exp(log p))`` where
    ``p <= 1/2`` (accurate, value and gradient, however small ``p`` gets), and as the log-sum-exp of the other
    tokens' log-probabilities where ``p > 1/2``: that stays exact up to ``p = 1``, where ``log p`` rounds to 0 and
    ``log1p(−exp(log p))`` to ``log 0``, so the tokens the model is surest of keep a finite, non-zero gradient
    instead of the zero a clamp would give them. It costs one more ``[B, T, V]`` tensor than the cross-entropy.

    Args:
        logits: ``[B, T, V]`` model outputs (fp32 or bf16).
        labels: ``[B, T]`` token ids, ``-100`` where ignored.
        threshold: a finite number <= 0, positions with ``log p < threshold`` add nothing; ``None``: every
            labelled position adds its term.

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 input), >= 0; 0 (graph kept) when no position is labelled.

    Raises:
        ConfigError: ``logits`` is not 3-D, ``labels`` is not ``[B, T]``, or ``threshold`` is not
            :data:`THRESHOLD_EXPECTED`.
    """
    if not is_threshold(threshold):
        raise ConfigError(f"threshold must be {THRESHOLD_EXPECTED}, got {threshold!r}")
    log_probs, targets = shifted_log_probs(logits, labels)
    labelled = targets != IGNORE_INDEX
    index = targets.masked_fill(~labelled, 0).unsqueeze(-1)
    log_p = log_probs.gather(-1, index).squeeze(-1)
    half = -math.log(2.0)
    # both branches are evaluated everywhere: the clamp keeps the unused one finite, so its zero gradient stays 0
    log_not_p = torch.where(
        log_p <= half,
        torch.log1p(-torch.exp(log_p.clamp(max=half))),
        torch.logsumexp(log_probs.scatter(-1, index, float("-inf")), dim=-1),
    )
    counted = labelled if threshold is None else labelled & (log_p >= threshold)
    return masked_mean(torch.where(counted, log_not_p.neg(), torch.zeros_like(log_not_p)), labelled)
