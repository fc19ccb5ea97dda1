"""Pure loss functions of TAR (no Lightning): CE, max-entropy, DPO, retain, random mapping, min-posterior.

Conventions: logits ``[B, T, V]``; labels ``[B, T]`` with ``-100`` ignored and ``logits[:, t]`` predicting
``labels[:, t + 1]``; attention masks ``[B, T]`` of 0/1; hidden states a tuple of ``[B, T, H]`` tensors as
returned by Hugging Face with ``output_hidden_states=True``. Reductions run in fp32 for bf16 inputs and every
loss returns a 0-dim tensor.
"""

from tar_lightning.losses.ce import causal_lm_loss, negative_ce_loss
from tar_lightning.losses.dpo import dpo_loss, sequence_logprobs
from tar_lightning.losses.entropy import (
    ENTROPY_POSITIONS,
    CandidateTokens,
    check_token_ids,
    entropy_position_mask,
    max_entropy_loss,
    mean_entropy,
    token_entropy,
    token_ids_problem,
)
from tar_lightning.losses.posterior import MIN_POSTERIOR_THRESHOLD, min_posterior_loss
from tar_lightning.losses.random_mapping import random_mapping_loss, random_mapping_table
from tar_lightning.losses.retain import representation_distance, retain_loss

__all__ = [
    "ENTROPY_POSITIONS",
    "MIN_POSTERIOR_THRESHOLD",
    "CandidateTokens",
    "causal_lm_loss",
    "check_token_ids",
    "dpo_loss",
    "entropy_position_mask",
    "max_entropy_loss",
    "mean_entropy",
    "min_posterior_loss",
    "negative_ce_loss",
    "random_mapping_loss",
    "random_mapping_table",
    "representation_distance",
    "retain_loss",
    "sequence_logprobs",
    "token_entropy",
    "token_ids_problem",
]
