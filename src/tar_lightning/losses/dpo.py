"""Summed sequence log-probabilities and the sigmoid DPO loss (the refusal TR loss)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from tar_lightning.errors import ConfigError
from tar_lightning.losses._common import IGNORE_INDEX
from tar_lightning.losses.ce import shifted_log_probs

__all__ = ["dpo_loss", "sequence_logprobs"]


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the log-probabilities of the labelled tokens of each sequence.

    ``logits[:, t]`` scores ``labels[:, t + 1]``; positions labelled ``-100`` (prompt, padding) contribute 0.

    Args:
        logits: ``[B, T, V]`` model outputs (fp32 or bf16).
        labels: ``[B, T]`` token ids, ``-100`` where ignored.

    Returns:
        ``[B]`` fp32 log-probabilities (0 for a sequence with no labelled token).

    Raises:
        ConfigError: ``logits`` is not 3-D or ``labels`` is not ``[B, T]``.
    """
    log_probs, targets = shifted_log_probs(logits, labels)
    keep = targets != IGNORE_INDEX
    # Ignored positions are gathered at index 0 (any valid index) and then zeroed.
    token_logps = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep.to(token_logps.dtype)).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Sigmoid DPO loss, ``mean(-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))))``.

    Reference log-probabilities are constants (detached).

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen (e.g. refusal) responses under the policy.
        policy_rejected_logps: ``[B]`` the same for the rejected (e.g. harmful) responses.
        ref_chosen_logps: ``[B]`` chosen log-probs under the reference model.
        ref_rejected_logps: ``[B]`` rejected log-probs under the reference model.
        beta: inverse temperature, > 0 (the paper uses 0.1).

    Returns:
        ``(loss, reward_accuracy)``: the 0-dim fp32 loss, and the detached fraction of pairs whose implicit
        chosen reward ``beta * (pi_c - ref_c)`` exceeds the rejected one ``beta * (pi_r - ref_r)``.

    Raises:
        ConfigError: ``beta`` is not a finite number > 0, or the four inputs do not share one shape.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"beta must be a finite number > 0, got {beta!r}")
    inputs = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"DPO log-prob tensors must all have the same shape [batch], got {shapes}")

    pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    ref_c, ref_r = ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()
    chosen_rewards = beta * (pi_c - ref_c)
    rejected_rewards = beta * (pi_r - ref_r)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    accuracy = (chosen_rewards > rejected_rewards).float().mean().detach()
    return loss, accuracy
