"""Bounded learned perturbations of activations: the ``embedding`` and ``latent`` adversaries.

An :class:`ActivationPerturbation` adds one learned vector δ to the output of one module at every position of
every sequence: the input-embedding module (``method: embedding``) or a decoder layer, i.e. the residual stream
after that layer (``method: latent``). The embedding attack may instead learn one vector per token id
(``embedding.scope: token``), added wherever that token occurs. It is a forward hook, so the weights never change; the vector is a child
module of the perturbed module while the attack runs (so ``model.parameters()`` shows it) and is removed with
the hook.

Why one universal vector (not a per-token table, not per-example perturbations): the attack is trained on one
data stream and must persist into every later evaluation (MCQ logits read at fixed positions, greedy generation
with a KV cache, left or right padding). A vector added at every position shifts no position, needs no
knowledge of the evaluator's inputs, and works unchanged for each new token during generation (the cached
positions already carry it). It is the input-space / residual-stream analogue of a universal adversarial
perturbation (or of a steering vector learned by gradient descent), with ``hidden_size`` trainable numbers. The
per-token table keeps the same properties (it depends only on the token at a position, never on the position)
and is much stronger: it is a norm-bounded edit of every input-embedding row that leaves the weights (and a tied
output head) alone, at the cost of ``vocab × hidden`` trainable numbers plus their optimizer state.

The bound: δ = radius · u with ``‖u‖₂ <= 1`` (per row for the token table); ``u`` is the trainable tensor (kept in float32, cast to the
activation dtype when added), so the optimizer's learning rate is in units of the radius and does not depend on
the model's activation scale. After every optimizer step ``u`` (each row of it) is projected back onto the
unit ball. The radius
is ``epsilon`` (``relative: false``) or ``epsilon`` times the mean L2 norm of the unperturbed activation over the
non-padding tokens of the attack's first batch, measured once when the attack starts (``relative: true``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from tar_lightning.errors import ConfigError, TARLightningError
from tar_lightning.models.layers import decoder_layers

__all__ = ["PERTURBATION_ATTR", "ActivationPerturbation", "resolve_layer", "site_output"]

#: the name under which the perturbation is a child module of the perturbed module during an attack
PERTURBATION_ATTR = "tar_adversary_perturbation"


class _Captured(Exception):
    """Raised by a capture hook to stop a forward pass once the wanted activation is read."""


def resolve_layer(layer: Optional[int], n_layers: int, key: str) -> int:
    """The 0-based index of decoder layer ``layer`` (negative counts from the end; ``None``: ``n_layers // 2``).

    Raises:
        ConfigError: the index is outside the model's ``n_layers`` layers (the message names ``key``).
    """
    if layer is None:
        return n_layers // 2
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise ConfigError(
            f"{key}={layer} is outside the model's {n_layers} decoder layers (valid: {-n_layers}..{n_layers - 1})"
        )
    return index


def _tensor_of(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def site_output(model: nn.Module, site: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The output of module ``site`` (``[batch, seq, hidden]``) when ``model`` reads ``batch``.

    The forward pass stops right after ``site`` (a hook raises), so reading an early layer costs only the layers
    before it. Runs without gradients; hooks already on ``site`` (e.g. a perturbation) run first.
    """
    box: list[Tensor] = []

    def capture(module, args, output):
        box.append(_tensor_of(output).detach())
        raise _Captured

    handle = site.register_forward_hook(capture)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise TARLightningError(f"the forward pass never reached {type(site).__name__}; cannot read its output")
    return box[0]


class ActivationPerturbation(nn.Module):
    """One learned vector δ = radius · u (``‖u‖₂ <= 1``) added to the output of ``site`` at every position.

    Args:
        model: the attacked model.
        site: the module whose output is perturbed (the input embeddings or a decoder layer of ``model``).
        hidden_size: the width of that output.
        vocab: with a number, one vector per token id (``site`` must be the input embeddings, whose first input
            holds the token ids); ``None``: one vector for every position.
        epsilon: the bound (see ``relative``).
        relative: the radius is ``epsilon`` × the mean norm of the unperturbed output over the non-padding tokens
            of the first batch given to :meth:`calibrate`; otherwise ``epsilon``.
        where: the site in words, for messages (``"input embeddings"``, ``"decoder layer 3"``).
    """

    def __init__(
        self, model: nn.Module, site: nn.Module, hidden_size: int, epsilon: float, relative: bool, where: str,
        vocab: Optional[int] = None,
    ) -> None:
        super().__init__()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        shape = (int(hidden_size),) if vocab is None else (int(vocab), int(hidden_size))
        self.unit = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        self.per_token = vocab is not None
        self.epsilon = float(epsilon)
        self.relative = bool(relative)
        self.where = where
        self.radius: Optional[float] = None if self.relative else self.epsilon
        self.reference_norm: Optional[float] = None
        self.active = True
        # not a child module (the site holds this module as its child, not the other way round)
        object.__setattr__(self, "_site", site)
        self._handle = site.register_forward_hook(self._add)
        site.add_module(PERTURBATION_ATTR, self)

    @classmethod
    def for_method(cls, model: nn.Module, method: str, layer: Optional[int], epsilon: float,
                   relative: bool, scope: str = "universal") -> ActivationPerturbation:
        """The perturbation of ``method`` (``embedding``: the input embeddings, one vector or, with ``scope:
        token``, one per token id; ``latent``: the output of decoder layer ``layer``) attached to ``model``.

        Raises:
            ConfigError: ``layer`` outside the model's layers, or a model without input embeddings.
        """
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(embeddings, "embedding_dim", None)
        if method == "embedding":
            if embeddings is None:
                raise ConfigError(f"method 'embedding': {type(model).__name__} has no input-embedding module")
            vocab = int(embeddings.num_embeddings) if scope == "token" else None
            return cls(model, embeddings, int(embeddings.embedding_dim), epsilon, relative, "input embeddings", vocab)
        layers = decoder_layers(model)
        index = resolve_layer(layer, len(layers), "latent.layer")
        if hidden is None:
            raise ConfigError(f"method 'latent': cannot tell the residual width of {type(model).__name__}")
        return cls(model, layers[index], int(hidden), epsilon, relative, f"decoder layer {index}")

    def delta(self) -> Tensor:
        """δ = radius · u (float32; ``[vocab, hidden]`` for the per-token table)."""
        if self.radius is None:
            raise TARLightningError(
                f"the {self.where} perturbation has no radius yet: call calibrate(model, batch) first"
            )
        return self.unit * self.radius

    def _add(self, module: nn.Module, args, output):
        if not self.active:
            return output
        h = _tensor_of(output)
        delta = self.delta()
        if self.per_token:
            delta = nn.functional.embedding(args[0], delta)
        h = h + delta.to(device=h.device, dtype=h.dtype)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        """Fixes the radius: with ``relative``, ``epsilon`` × the mean L2 norm of the unperturbed output of the
        site over the tokens of ``batch`` whose ``attention_mask`` is 1 (all tokens without a mask).

        Raises:
            TARLightningError: the measured norm is zero or not finite.
        """
        if self.radius is not None:
            return
        assert self._site is not None
        self.active = False
        try:
            h = site_output(model, self._site, batch)
        finally:
            self.active = True
        norms = h.double().norm(dim=-1)
        mask = batch.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones_like(norms, dtype=torch.bool)
        mean = float(norms[keep].mean()) if bool(keep.any()) else float("nan")
        if not mean > 0 or mean == float("inf"):
            raise TARLightningError(f"the mean norm of the {self.where} output is {mean}; cannot set a relative bound")
        self.reference_norm = mean
        self.radius = self.epsilon * mean

    @torch.no_grad()
    def project_(self) -> None:
        """Puts ``u`` (each row of the per-token table) back onto the unit ball (so ``‖δ‖₂ <= radius``)."""
        norm = self.unit.double().norm(dim=-1, keepdim=True)
        self.unit.mul_((1.0 / norm.clamp(min=1.0)).to(self.unit.dtype))

    def remove(self) -> None:
        """Removes the hook and detaches the vector from the perturbed module (safe to call twice)."""
        if self._site is not None:
            self._handle.remove()
            if getattr(self._site, PERTURBATION_ATTR, None) is self:
                delattr(self._site, PERTURBATION_ATTR)
            object.__setattr__(self, "_site", None)
