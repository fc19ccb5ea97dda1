"""The random-mapping safeguard loss (stage 1 of TAR): map hidden states onto fixed random token vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tar_lightning.common import is_int
from tar_lightning.errors import ConfigError
from tar_lightning.losses._common import check_batch_seq, masked_mean

__all__ = ["random_mapping_loss", "random_mapping_table"]

_COSINE_EPS = 1e-8


def random_mapping_table(
    vocab_size: int,
    hidden_size: int,
    seed: int = 42,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A fixed table of i.i.d. N(0, 1) vectors, one per token id.

    Drawn in fp32 on the CPU with its own ``torch.Generator(seed)``, so it is identical on every machine and
    rank and does not depend on, or advance, the global RNG; then cast to ``dtype`` and moved to ``device``.

    Args:
        vocab_size: number of rows (token ids), > 0.
        hidden_size: number of columns (the model's hidden size), > 0.
        seed: generator seed.
        dtype: dtype of the returned table.
        device: device of the returned table (``None``: CPU).

    Returns:
        A ``[vocab_size, hidden_size]`` tensor without grad.

    Raises:
        ConfigError: ``vocab_size`` or ``hidden_size`` is not a positive int, or ``seed`` is not an int.
    """
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size)):
        if not is_int(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if not is_int(seed):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float32, device="cpu")
    return table.to(dtype=dtype, device=device)


def random_mapping_loss(
    hidden_states: Sequence[Tensor],
    input_ids: Tensor,
    table: Tensor,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Mean over layers and tokens of ``1 - |cos(h_l[t], table[input_ids[t]])|``.

    The absolute value makes a hidden state anti-parallel to its target as good as a parallel one.

    Args:
        hidden_states: ``[B, T, H]`` tensors (HF ``output_hidden_states=True``); every tensor counts.
        input_ids: ``[B, T]`` token ids indexing ``table``.
        table: ``[V, H]`` from :func:`random_mapping_table`; a constant (detached).
        attention_mask: ``[B, T]`` of 0/1; only positions with 1 count. ``None`` counts every position.

    Returns:
        A 0-dim fp32 tensor in ``[0, 1]``; 0 (graph kept) when no position is selected.

    Raises:
        ConfigError: empty ``hidden_states``, a hidden state that is not ``[B, T, H]`` with ``H`` equal to the
            table's width, or ``input_ids``/``attention_mask`` not ``[B, T]``.
    """
    layers = (hidden_states,) if isinstance(hidden_states, Tensor) else tuple(hidden_states)
    if not layers:
        raise ConfigError("hidden_states must hold at least one [batch, seq, hidden] tensor, got none")
    if table.dim() != 2:
        raise ConfigError(f"table must be [vocab, hidden], got shape {tuple(table.shape)}")
    first = layers[0]
    check_batch_seq(input_ids, "input_ids", tuple(first.shape[:2]))
    check_batch_seq(attention_mask, "attention_mask", tuple(first.shape[:2]))

    targets = F.embedding(input_ids.to(table.device), table.detach()).to(
        device=first.device, dtype=torch.float32
    )
    mask = (
        attention_mask.to(first.device) != 0
        if attention_mask is not None
        else torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
    )
    distances = []
    for i, h in enumerate(layers):
        if h.dim() != 3 or tuple(h.shape) != tuple(targets.shape):
            raise ConfigError(
                f"hidden_states[{i}] has shape {tuple(h.shape)} but [batch, seq, table hidden] = "
                f"{tuple(targets.shape)} was expected"
            )
        cos = F.cosine_similarity(h.float(), targets, dim=-1, eps=_COSINE_EPS)
        distances.append(masked_mean(1.0 - cos.abs(), mask))
    return torch.stack(distances).mean()
