"""Refusal-direction ablation (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

:class:`RefusalDirection` estimates the refusal direction as the difference between the mean activation of
harmful and of harmless prompts at one decoder layer's output and one token position counted from the end of
the prompt, normalised (sums and counts in float64); :func:`orthogonalize_residual_writers` then removes that
direction from everything that writes into the residual stream, so no layer can write along it any more:

- the input embeddings ``E`` (``[vocab, hidden]``, a row per token): ``E ← E − (E r) rᵀ``;
- every decoder layer's attention output projection and MLP down projection (``nn.Linear`` weights
  ``W`` of shape ``[hidden, in]``, output ``W x``): ``W ← W − r (rᵀ W)``, and a bias ``b ← b − r (rᵀ b)``.

The projections are computed in float64 (in chunks, so an 8B model's embedding matrix is not copied whole) and
written back in the weight's dtype. With tied input/output embeddings (e.g. SmolLM2) the output head is the same
matrix and changes with it, as in the reference implementation.

The residual-writing modules are found by name: ``self_attn.o_proj`` / ``mlp.down_proj`` (Llama, SmolLM2,
Mistral, Qwen2, Gemma) and ``attention.dense`` / ``mlp.dense_4h_to_h`` (GPT-NeoX); another architecture gets a
:class:`~tar_lightning.errors.ConfigError` listing its linear layers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from tar_lightning.adversaries.config import RefusalAblationConfig
from tar_lightning.adversaries.perturbation import resolve_layer, site_output
from tar_lightning.errors import ConfigError, DataError, TARLightningError
from tar_lightning.models.layers import decoder_layers

__all__ = [
    "RESIDUAL_WRITERS",
    "RefusalDirection",
    "orthogonalize_residual_writers",
    "prompt_positions",
    "residual_writers",
]

#: name suffixes (inside a decoder layer) of the linear layers that write into the residual stream
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj", "attention.dense", "mlp.dense_4h_to_h")

IGNORE_INDEX = -100
_CHUNK = 8192


def prompt_positions(batch: dict[str, Tensor], position: int) -> Tensor:
    """The index, per row, of the token ``position`` counted from the end of the row's prompt.

    The prompt is the leading run of tokens labelled -100 among the row's non-padding tokens (for chat data:
    everything up to and including the generation prompt). A row with no such run (plain text, every token
    labelled) or with no labelled token at all is prompt from start to end. ``position`` -1 is the prompt's last
    token. Works with left and right padding.

    Raises:
        DataError: a prompt shorter than ``-position`` tokens.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    out = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
        where = keep.nonzero().flatten()
        if where.numel() == 0:
            raise DataError("refusal_ablation: a batch row has no non-padding token")
        start, end = int(where[0]), int(where[-1]) + 1
        prompt_end = end
        if labels is not None:
            labelled = (labels[i, start:end] != IGNORE_INDEX).nonzero().flatten()
            if labelled.numel() and int(labelled[0]) > 0:
                prompt_end = start + int(labelled[0])
        index = prompt_end + position
        if index < start:
            raise DataError(
                f"refusal_ablation.position={position}: a prompt has only {prompt_end - start} tokens"
            )
        out.append(index)
    return torch.tensor(out, dtype=torch.long, device=ids.device)


def residual_writers(model: nn.Module) -> tuple[nn.Module, list[tuple[str, nn.Linear]]]:
    """The input-embedding module and the named linear layers that write into the residual stream.

    Raises:
        ConfigError: a decoder layer without a known residual-writing layer (the message lists its linear layers).
    """
    embeddings = model.get_input_embeddings()
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    writers: list[tuple[str, nn.Linear]] = []
    for index, layer in enumerate(layers):
        found = [
            (f"{names[id(layer)]}.{n}", m) for n, m in layer.named_modules()
            if isinstance(m, nn.Linear) and any(n == s or n.endswith("." + s) for s in RESIDUAL_WRITERS)
        ]
        if not found:
            linear = sorted(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
            raise ConfigError(
                f"refusal_ablation: decoder layer {index} of {type(model).__name__} has none of the known "
                f"residual-writing layers {list(RESIDUAL_WRITERS)}; its linear layers are {linear}"
            )
        writers.extend(found)
    return embeddings, writers


def _check_plain(name: str, tensor: Tensor) -> None:
    if isinstance(tensor, DTensor):
        raise ConfigError(
            f"refusal_ablation: {name} is sharded (FSDP2); ablate a model whose weights are plain tensors"
        )


@torch.no_grad()
def orthogonalize_residual_writers(model: nn.Module, direction: Tensor) -> list[str]:
    """Removes ``direction`` (normalised here, in float64) from every residual-writing weight of ``model`` in
    place (see the module docstring for the formulas).

    Returns:
        The names of the changed parameters.

    Raises:
        ConfigError: an unknown architecture, or sharded weights.
    """
    embeddings, writers = residual_writers(model)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    changed = []
    weight = embeddings.weight
    _check_plain("the input embeddings", weight)
    r = direction.detach().to(device=weight.device, dtype=torch.float64).flatten()
    r = r / r.norm()
    for lo in range(0, weight.shape[0], _CHUNK):  # rows: E ← E − (E r) rᵀ
        rows = weight[lo : lo + _CHUNK].double()
        weight[lo : lo + _CHUNK] = (rows - torch.outer(rows @ r, r)).to(weight.dtype)
    changed.append(names.get(id(weight), "input_embeddings.weight"))
    for name, linear in writers:
        w = linear.weight
        _check_plain(name, w)
        rr = r.to(w.device)
        for lo in range(0, w.shape[1], _CHUNK):  # columns: W ← W − r (rᵀ W)
            cols = w[:, lo : lo + _CHUNK].double()
            w[:, lo : lo + _CHUNK] = (cols - torch.outer(rr, rr @ cols)).to(w.dtype)
        changed.append(f"{name}.weight")
        if linear.bias is not None:
            b = linear.bias.double()
            linear.bias.copy_((b - rr * (rr @ b)).to(linear.bias.dtype))
            changed.append(f"{name}.bias")
    return changed


class RefusalDirection:
    """Accumulates the harmful and harmless mean activations and ablates their normalised difference.

    Args:
        model: the model to attack.
        spec: the ``refusal_ablation`` settings (layer and position).

    Raises:
        ConfigError: ``spec.layer`` outside the model's decoder layers.
    """

    def __init__(self, model: nn.Module, spec: RefusalAblationConfig) -> None:
        layers = decoder_layers(model)
        self.layer = resolve_layer(spec.layer, len(layers), "refusal_ablation.layer")
        self.site = layers[self.layer]
        self.position = int(spec.position)
        self.sums: dict[bool, Optional[Tensor]] = {True: None, False: None}
        self.counts = {True: 0, False: 0}
        self.raw: Optional[Tensor] = None
        self.changed: list[str] = []

    @torch.no_grad()
    def observe(self, model: nn.Module, batch: dict[str, Tensor], harmful: bool) -> Tensor:
        """Adds the batch's activations (at the layer's output, token ``position`` of every prompt) to the
        harmful or harmless sum; returns their mean L2 norm (a finite number to log as this step's "loss")."""
        h = site_output(model, self.site, batch)
        rows = torch.arange(h.shape[0], device=h.device)
        x = h[rows, prompt_positions(batch, self.position).to(h.device)].double()
        total = x.sum(dim=0).cpu()
        self.sums[harmful] = total if self.sums[harmful] is None else self.sums[harmful] + total
        self.counts[harmful] += x.shape[0]
        return x.norm(dim=-1).mean().float()

    def direction(self) -> Tensor:
        """The unit refusal direction (float64, on the CPU): mean(harmful) − mean(harmless), normalised.

        Raises:
            TARLightningError: one of the two sets was never observed, or the means coincide.
        """
        missing = [k for k, v in (("harmful", True), ("harmless", False)) if not self.counts[v]]
        if missing:
            raise TARLightningError(
                f"refusal_ablation: no {' and no '.join(missing)} prompts were read; give steps >= 2 so both the "
                "harmless and the harmful stream are read"
            )
        raw = self.sums[True] / self.counts[True] - self.sums[False] / self.counts[False]
        norm = float(raw.norm())
        if not norm > 0 or norm == float("inf"):
            raise TARLightningError(f"refusal_ablation: the difference of means has norm {norm}; no direction")
        self.raw = raw
        return raw / norm

    def apply(self, model: nn.Module) -> Tensor:
        """Orthogonalises ``model``'s residual-writing weights against the direction; returns the direction."""
        r = self.direction()
        self.changed = orthogonalize_residual_writers(model, r)
        return r
