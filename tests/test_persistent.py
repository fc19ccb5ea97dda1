"""Persistent adversaries: later trajectories continue stored attacked deltas (tar_lightning.persistent)."""

import copy

import lightning as L
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, ConfigError, TARConfig, TARModule
from tar_lightning.losses import causal_lm_loss
from tar_lightning.models import tiny_llama
from tar_lightning.persistent import AdversaryPool
from tar_lightning.snapshot import ParameterSnapshot


def sgd(lr, **kw):
    return AdversaryConfig(name=kw.pop("name", "sgd"), data="forget", optimizer="sgd",
                           optimizer_kwargs={"momentum": 0.0}, lr=lr, weight_decay=0.0, **kw)


def ce(model, mb):
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
    return causal_lm_loss(out.logits, mb["labels"])


def micro(bundle, stream, i):
    return {k: v[i] for k, v in bundle[stream].items()}


def trainer(steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, max_steps=steps, log_every_n_steps=1, **kw)


def expected_outer_step(model, bundle, start_delta, K, adv_lr, outer_lr, lam_tr):
    """One first-order TAR step by hand: the attack starts at θ + δ; returns (θ_new, δ_new = θ'_K − θ)."""
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, start_delta, strict=True):
            p += d
    tr = [torch.zeros_like(p) for p in params]
    for k in range(K):
        grads = torch.autograd.grad(ce(model, micro(bundle, "forget", k)), params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p -= adv_lr * g
        grads = torch.autograd.grad(lam_tr * (1.0 / K) * -ce(model, micro(bundle, "tr", 0)), params, allow_unused=True)
        for acc, g in zip(tr, grads, strict=True):
            if g is not None:
                acc += g
    delta = [p.detach() - t for p, t in zip(params, theta, strict=True)]
    with torch.no_grad():
        for p, t in zip(params, theta, strict=True):
            p.copy_(t)
    ret = torch.autograd.grad(ce(model, micro(bundle, "retain", 0)), params, allow_unused=True)
    new = []
    with torch.no_grad():
        for p, t, gr, gt in zip(params, theta, ret, tr, strict=True):
            p.copy_(t - outer_lr * ((torch.zeros_like(t) if gr is None else gr) + gt))
            new.append(p.detach().clone())
    return new, delta


def test_second_step_continues_the_first_trajectory_as_by_hand():
    model, tok = tiny_llama()
    model = model.double()
    reference = copy.deepcopy(model)
    K, adv_lr, outer_lr, lam = 2, 0.05, 0.1, 2.0
    cfg = TARConfig(inner_steps=K, tr_every=1, tr_loss="neg_ce", weighting="uniform", tr_weight=lam,
                    adversaries=[sgd(adv_lr)], persistent_pool=1, persistent_probability=1.0, persistent_horizon=100)
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=outer_lr), tokenizer=tok)
    bundles = [random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=s) for s in (1, 2)]

    zero = [torch.zeros_like(p) for p in reference.parameters()]
    _, delta0 = expected_outer_step(reference, bundles[0], zero, K, adv_lr, outer_lr, lam)
    theta2, delta1 = expected_outer_step(reference, bundles[1], delta0, K, adv_lr, outer_lr, lam)
    trainer(2).fit(module, DataLoader(bundles, batch_size=None))
    for (name, p), e in zip(module.model.named_parameters(), theta2, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
    pool = module.adversary_pool
    assert len(pool) == 1 and pool.entries[0].steps == 2 * K
    for d, e in zip(pool.entries[0].delta, delta1, strict=True):
        torch.testing.assert_close(d, e, rtol=1e-6, atol=1e-8)
    assert any(d.abs().max() > 0 for d in pool.entries[0].delta)


def test_continuation_changes_the_update_and_pool_off_is_the_paper_step():
    model, tok = tiny_llama()

    def run(pool):
        torch.manual_seed(0)
        cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[sgd(0.05)], persistent_pool=pool,
                        persistent_probability=1.0, persistent_horizon=100)
        m = TARModule(copy.deepcopy(model), cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), tokenizer=tok)
        bundles = [random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=s) for s in (1, 2)]
        trainer(2).fit(m, DataLoader(bundles, batch_size=None))
        return [p.detach().clone() for p in m.model.parameters()]

    off, on = run(0), run(2)
    assert any(not torch.equal(a, b) for a, b in zip(off, on, strict=True))


def test_pool_retires_at_the_horizon_and_replaces_when_full():
    params = [torch.nn.Parameter(torch.zeros(3))]
    pool = AdversaryPool(size=2, horizon=6, device=None)

    def attack(step):
        snap = ParameterSnapshot(params)
        with torch.no_grad():
            params[0] += step
        return snap

    for i in range(3):  # two appended, the third replaces slot 5 % 2 = 1
        snap = attack(float(i + 1))
        pool.record(params, snap, continued=None, adversary=i, lr=0.1 * i, steps=2, replace=5)
        snap.restore()
    assert [e.adversary for e in pool.entries] == [0, 2]
    assert torch.equal(pool.entries[1].delta[0], torch.full((3,), 3.0))
    pool.apply(0, params)  # θ ← θ + δ
    assert torch.equal(params[0].detach(), torch.full((3,), 1.0))
    with torch.no_grad():
        params[0].zero_()
    snap = ParameterSnapshot(params)
    pool.record(params, snap, continued=0, adversary=0, lr=0.0, steps=2)  # 4 steps: kept
    assert pool.entries[0].steps == 4
    pool.record(params, snap, continued=0, adversary=0, lr=0.0, steps=2)  # 6 = horizon: retired
    assert [e.adversary for e in pool.entries] == [2]


def test_pool_state_round_trips_through_a_checkpoint(tmp_path):
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[sgd(0.05)], persistent_pool=2, persistent_horizon=10)
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), tokenizer=tok)
    bundles = [random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=s) for s in (1, 2, 3)]
    t = trainer(3)
    t.fit(module, DataLoader(bundles, batch_size=None))
    t.save_checkpoint(tmp_path / "a.ckpt")
    fresh = TARModule(copy.deepcopy(model), cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), tokenizer=tok)
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    fresh.on_load_checkpoint(ckpt)
    assert len(fresh.adversary_pool) == len(module.adversary_pool) > 0
    for a, b in zip(fresh.adversary_pool.entries, module.adversary_pool.entries, strict=True):
        assert (a.adversary, a.lr, a.steps) == (b.adversary, b.lr, b.steps)
        assert all(torch.equal(x, y) for x, y in zip(a.delta, b.delta, strict=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(persistent_pool=-1), "persistent_pool"),
        (dict(persistent_pool=2, persistent_probability=1.5), "persistent_probability"),
        (dict(persistent_pool=2, persistent_horizon=4), "persistent_horizon"),
        (dict(persistent_pool=2, adversaries=[AdversaryConfig(name="l", method="lora")]), "every adversary is LoRA"),
    ],
)
def test_bad_persistent_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TARConfig(inner_steps=4, tr_every=2, **kwargs).validate()
