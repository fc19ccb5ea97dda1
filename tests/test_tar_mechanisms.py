"""MUDMAN's mechanisms as TARConfig options: disruption masking, normalised TR gradients, the forked adversary.

Each option runs real outer steps of :class:`TARModule` through ``lightning.Trainer.fit`` on a fp64 tiny Llama;
the expected weights are computed here with ``torch.autograd.grad`` and the formulas written out (SGD adversary,
negative-CE TR loss, next-token CE retain loss, outer SGD). Nothing of the library computes the expectation.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, ConfigError, TARConfig, TARModule
from tar_lightning.models import tiny_llama

RTOL, ATOL = 1e-6, 1e-8
ADV_LR, OUTER_LR, LAM_TR, LAM_RET = 0.05, 0.1, 2.0, 0.7
IGNORE = -100


def sgd_adversary() -> AdversaryConfig:
    return AdversaryConfig(name="sgd", data="forget", optimizer="sgd", optimizer_kwargs={"momentum": 0.0},
                           lr=ADV_LR, weight_decay=0.0)


def micro(bundle: dict, stream: str, i: int) -> dict:
    return {k: v[i] for k, v in bundle[stream].items()}


def cross_entropy(model, mb: dict) -> torch.Tensor:
    """Mean over labelled positions of −log p(labels[t+1] | ..t), written out."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = mb["labels"][:, 1:]
    keep = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def grads(loss, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]


def config(**kw) -> TARConfig:
    base = dict(tr_every=1, tr_loss="neg_ce", weighting="uniform", tr_weight=LAM_TR, retain_weight=LAM_RET,
                adversaries=[sgd_adversary()])
    base.update(kw)
    return TARConfig(**base)


def library(model, tok, cfg: TARConfig, bundles: list) -> list[torch.Tensor]:
    module = TARModule(copy.deepcopy(model), cfg, optimizer=lambda p: torch.optim.SGD(p, lr=OUTER_LR), tokenizer=tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=len(bundles),
                        log_every_n_steps=1)
    trainer.fit(module, DataLoader(bundles, batch_size=None))
    assert trainer.global_step == len(bundles)
    return [p.detach().clone() for p in module.model.parameters()]


def tr_and_retain(model, bundle: dict, K: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One outer step's G = Σ_k λ_TR·(1/K)·∇(−CE_tr)(θ'_{k+1}) (K SGD adversary steps from θ) and
    g_R = λ_ret·∇CE_retain(θ); the model's weights are θ again afterwards."""
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    tr = [torch.zeros_like(p) for p in params]
    for k in range(K):
        g = grads(cross_entropy(model, micro(bundle, "forget", k)), params)
        with torch.no_grad():
            for p, gp in zip(params, g, strict=True):
                p -= ADV_LR * gp
        for acc, gt in zip(tr, grads(LAM_TR * (1.0 / K) * -cross_entropy(model, micro(bundle, "tr", 0)), params),
                           strict=True):
            acc += gt
    with torch.no_grad():
        for p, t in zip(params, theta, strict=True):
            p.copy_(t)
    retain = grads(LAM_RET * cross_entropy(model, micro(bundle, "retain", 0)), params)
    return tr, retain


def setup(K: int, steps: int = 1):
    model, tok = tiny_llama()
    model = model.double()
    streams = config(inner_steps=K).stream_steps()
    bundles = [random_bundle(len(tok), streams, batch=2, length=10, seed=20 + s) for s in range(steps)]
    return model, tok, bundles


@pytest.mark.parametrize("mask,normalize", [(True, False), (False, True), (True, True)])
def test_masked_and_normalised_outer_step_equals_autograd_combination(mask, normalize):
    """θ_new = θ − η(g_R + s·(m ⊙ G)), m = [sign G = sign g_R] (or 1), s = λ_TR/‖G‖ (or 1)."""
    K = 2
    model, tok, bundles = setup(K)
    reference = copy.deepcopy(model)
    theta = [p.detach().clone() for p in reference.parameters()]
    G, g_r = tr_and_retain(reference, bundles[0], K)
    norm = torch.sqrt(sum((g * g).sum() for g in G))
    keep = [(torch.sign(g) == torch.sign(r)).to(g.dtype) if mask else torch.ones_like(g)
            for g, r in zip(G, g_r, strict=True)]
    scale = LAM_TR / norm if normalize else 1.0
    expected = [t - OUTER_LR * (r + scale * (m * g)) for t, r, m, g in zip(theta, g_r, keep, G, strict=True)]
    plain = [t - OUTER_LR * (r + g) for t, r, g in zip(theta, g_r, G, strict=True)]

    got = library(model, tok, config(inner_steps=K, disruption_mask=mask, normalize_tr_grad=normalize), bundles)
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want, rtol=RTOL, atol=ATOL)
    # the options act: the result is far from plain TAR's, and the mask keeps a real share of the elements
    worst = max(float((a - b).abs().max()) for a, b in zip(expected, plain, strict=True))
    assert worst > 1e3 * ATOL
    if mask:
        kept = sum(float(m.sum()) for m in keep) / sum(m.numel() for m in keep)
        assert 0.1 < kept < 0.9, kept


def test_forked_adversary_continues_its_own_weights_and_reforks_every_n_steps():
    """fork_every=2, K=1: the adversary forks from θ on steps 0 and 2 and on step 1 continues from its own
    attacked weights (not θ_1 + δ); its one evaluation point weighs 1/(L/tr_every) = 1/2 (uniform over the
    L = 2 steps of the whole attack)."""
    N, K, steps = 2, 1, 3
    model, tok, bundles = setup(K, steps)
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    adversary = None
    for s, bundle in enumerate(bundles):
        theta = [p.detach().clone() for p in params]
        if s % N == 0:  # fork
            adversary = [t.clone() for t in theta]
        with torch.no_grad():
            for p, a in zip(params, adversary, strict=True):
                p.copy_(a)
        g = grads(cross_entropy(reference, micro(bundle, "forget", 0)), params)
        with torch.no_grad():
            for p, gp in zip(params, g, strict=True):
                p -= ADV_LR * gp
        tr = grads(LAM_TR * 0.5 * -cross_entropy(reference, micro(bundle, "tr", 0)), params)
        adversary = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
        retain = grads(LAM_RET * cross_entropy(reference, micro(bundle, "retain", 0)), params)
        with torch.no_grad():
            for p, t, r, gt in zip(params, theta, retain, tr, strict=True):
                p.copy_(t - OUTER_LR * (r + gt))
    expected = [p.detach() for p in params]

    cfg = config(inner_steps=K, fork_every=N)
    assert cfg.tr_weights(0) == cfg.tr_weights(1) == [0.5]
    got = library(model, tok, cfg, bundles)
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want, rtol=RTOL, atol=ATOL)


def test_long_horizon_tr_weights_follow_the_global_step():
    """Exponential exp(rate·(g − (L−1))) over the whole attack of L = K·⌈horizon/K⌉ steps, normalised over all its
    evaluation points; without the option (``delta``) every trajectory has the K-step weights."""
    rate, K, every = 0.5, 4, 2
    cfg = TARConfig(inner_steps=K, tr_every=every, weighting_rate=rate, normalize_weights=True, persistent_pool=1,
                    persistent_horizon=10, persistent_state="full")
    assert cfg.attack_horizon() == 12
    points = [1, 3, 5, 7, 9, 11]
    total = sum(torch.exp(torch.tensor(rate * (g - 11.0), dtype=torch.float64)) for g in points)
    for start in (0, 4, 8):
        want = [float(torch.exp(torch.tensor(rate * (start + k - 11.0), dtype=torch.float64)) / total) for k in (1, 3)]
        assert cfg.tr_weights(start) == pytest.approx(want, rel=1e-12)
    delta = TARConfig(inner_steps=K, tr_every=every, weighting_rate=rate, persistent_pool=1, persistent_horizon=10)
    assert delta.tr_weights(8) == delta.tr_weights(0) == pytest.approx([torch.exp(torch.tensor(-1.0)).item(), 1.0])
    uniform = TARConfig(inner_steps=K, tr_every=every, weighting="uniform", fork_every=3)
    assert uniform.tr_weights(4) == [1 / 6, 1 / 6]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(disruption_mask=1), "disruption_mask"),
        (dict(normalize_tr_grad="yes"), "normalize_tr_grad"),
        (dict(disruption_mask=True, retain_weight=0.0), "disruption_mask.*retain_weight"),
        (dict(persistent_state="optimizer"), "persistent_state"),
        (dict(persistent_state="full"), "persistent_state.*persistent_pool > 0"),
        (dict(persistent_pool=1, persistent_state="full", inner_steps=6, tr_every=4), "persistent_state.*multiple"),
        (dict(fork_every=-1), "fork_every"),
        (dict(fork_every=2, persistent_pool=2), "fork_every.*persistent_pool"),
        (dict(fork_every=2, trajectories=2), "fork_every.*trajectories"),
        (dict(fork_every=2, adversaries=[AdversaryConfig(name="l", method="lora")]), "fork_every.*LoRA"),
    ],
)
def test_bad_mechanism_settings_are_clear_errors(kwargs, match):
    base = dict(inner_steps=4, tr_every=2)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=f"TARConfig.{match}"):
        TARConfig(**base).validate()


def test_tr_stream_by_data_picks_each_trajectorys_tr_stream_and_rejects_unknown_streams():
    halves = [AdversaryConfig(name="on_1", data="forget_1"), AdversaryConfig(name="on_2", data="forget_2"),
              AdversaryConfig(name="benign", data="retain_domain")]
    cfg = TARConfig(inner_steps=4, tr_every=2, adversaries=halves,
                    tr_stream_by_data={"forget_1": "tr_2", "forget_2": "tr_1"}).validate()
    assert [cfg.tr_stream_for(a) for a in halves] == ["tr_2", "tr_1", "tr"]
    assert cfg.stream_steps() == {"retain": 1, "tr_2": 1, "forget_1": 4, "tr_1": 1, "forget_2": 4, "tr": 1,
                                  "retain_domain": 4}
    with pytest.raises(ConfigError, match=r"tr_stream_by_data.*\['forget'\] are the data of no adversary.*"
                                          r"\['forget_1', 'forget_2', 'retain_domain'\]"):
        TARConfig(adversaries=halves, tr_stream_by_data={"forget": "tr_2"}).validate()
    for bad in ({"forget_1": ""}, {"forget_1": 3}, ["forget_1"]):
        with pytest.raises(ConfigError, match="tr_stream_by_data.*expected a mapping"):
            TARConfig(adversaries=halves, tr_stream_by_data=bad).validate()
