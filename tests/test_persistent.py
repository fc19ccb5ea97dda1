"""Persistent adversaries: later trajectories continue stored attacked deltas (tar_lightning.persistent)."""

import copy
import math
import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
from conftest import random_bundle
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, ConfigError, TARConfig, TARModule
from tar_lightning.losses import causal_lm_loss
from tar_lightning.models import tiny_llama
from tar_lightning.persistent import AdversaryPool, load_optimizer_state, optimizer_state
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


# -- persistent_state: full -- a continued trajectory is one longer attack ----------------------------------------

ADAMW = dict(lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def adamw(**kw):
    a = ADAMW
    return AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=a["lr"], weight_decay=a["weight_decay"],
                           optimizer_kwargs={"betas": a["betas"], "eps": a["eps"]}, **kw)


def cosine(t, warmup, total):
    """transformers' warmup + half-cosine multiplier at scheduler step t, written out."""
    if t < warmup:
        return t / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (total - warmup)))


class HandAdamW:
    """AdamW (decoupled decay, bias-corrected moments) over one attack, its state kept across calls."""

    def __init__(self, params, schedule=lambda t: 1.0):
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.n = 0
        self.schedule = schedule

    @torch.no_grad()
    def step(self, params, grads_):
        a = ADAMW
        lr = a["lr"] * self.schedule(self.n)
        b1, b2 = a["betas"]
        self.n += 1
        for p, g, m, v in zip(params, grads_, self.m, self.v, strict=True):
            p *= 1.0 - lr * a["weight_decay"]
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            p -= lr * (m / (1 - b1**self.n)) / ((v / (1 - b2**self.n)).sqrt() + a["eps"])


def grads_of(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]


def test_full_state_continuation_equals_one_attack_of_2k_steps():
    """Two outer steps (outer lr 0, so θ stays θ_0) of a pooled trajectory of K steps each = one AdamW attack of
    2K steps from θ_0 with a warmup+cosine schedule over L = 9 steps, computed here: same weights, same moments,
    same step count and schedule position. The ``delta`` default starts a fresh optimizer instead and differs."""
    model, tok = tiny_llama()
    model = model.double()
    K, L_ = 3, 9

    def run(state):
        cfg = TARConfig(inner_steps=K, tr_every=1, tr_loss="neg_ce", weighting="uniform",
                        adversaries=[adamw(schedule="warmup_cosine", warmup_steps=1)], persistent_pool=1,
                        persistent_probability=1.0, persistent_horizon=7, persistent_state=state)
        m = TARModule(copy.deepcopy(model), cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), tokenizer=tok)
        bundles = [random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=s) for s in (1, 2)]
        trainer(2).fit(m, DataLoader(bundles, batch_size=None))
        return m, bundles

    module, bundles = run("full")
    assert module.config.attack_horizon() == L_

    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    theta0 = [p.detach().clone() for p in params]
    opt = HandAdamW(params, lambda t: cosine(t, 1, L_))
    for bundle in bundles:
        for k in range(K):
            opt.step(params, grads_of(ce(reference, micro(bundle, "forget", k)), params))
    expected_delta = [p.detach() - t for p, t in zip(params, theta0, strict=True)]

    for p, t in zip(module.model.parameters(), theta0, strict=True):
        assert torch.equal(p.detach(), t)  # outer lr 0: the start of both outer steps is θ_0
    (entry,) = module.adversary_pool.entries
    assert entry.steps == 2 * K
    for d, e in zip(entry.delta, expected_delta, strict=True):
        torch.testing.assert_close(d, e, rtol=1e-6, atol=1e-10)
    state = entry.optimizer
    for s, m, v in zip(state["state"], opt.m, opt.v, strict=True):
        torch.testing.assert_close(s["exp_avg"], m, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(s["exp_avg_sq"], v, rtol=1e-6, atol=1e-16)
        assert float(s["step"]) == 2 * K
    assert state["scheduler"]["last_epoch"] == 2 * K
    assert state["groups"][0]["lr"] == pytest.approx(ADAMW["lr"] * cosine(2 * K, 1, L_))

    fresh, _ = run("delta")  # today's behaviour: a fresh optimizer and a K-step schedule for the second piece
    (old,) = fresh.adversary_pool.entries
    assert old.optimizer is None
    assert max(float((d - e).abs().max()) for d, e in zip(old.delta, expected_delta, strict=True)) > 1e-4


def test_full_state_outer_steps_match_hand_computation_with_global_tr_weights():
    """Outer SGD steps with the pool in ``full`` mode against a hand computation: step 1 continues the AdamW
    attack of step 0 (moments, step count) from θ_1 + δ, and its TR points weigh by their global step:
    w(g) = exp(rate·(g − (L−1))) / Σ_{g'<L} exp(rate·(g' − (L−1))), L = K·⌈5/K⌉ = 6."""
    model, tok = tiny_llama()
    model = model.double()
    K, rate, L_, lam, outer_lr = 2, 0.5, 6, 2.0, 0.1
    cfg = TARConfig(inner_steps=K, tr_every=1, tr_loss="neg_ce", weighting="exponential", weighting_rate=rate,
                    normalize_weights=True, tr_weight=lam, adversaries=[adamw()], persistent_pool=1,
                    persistent_probability=1.0, persistent_horizon=5, persistent_state="full")
    bundles = [random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=s) for s in (3, 4)]
    module = TARModule(copy.deepcopy(model), cfg, optimizer=lambda p: torch.optim.SGD(p, lr=outer_lr), tokenizer=tok)
    trainer(2).fit(module, DataLoader(bundles, batch_size=None))

    total = sum(math.exp(rate * (g - (L_ - 1))) for g in range(L_))
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    opt = HandAdamW(params)
    delta = [torch.zeros_like(p) for p in params]
    for s, bundle in enumerate(bundles):
        theta = [p.detach().clone() for p in params]
        tr = [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            for p, d in zip(params, delta, strict=True):
                p += d
        for k in range(K):
            opt.step(params, grads_of(ce(reference, micro(bundle, "forget", k)), params))
            w = math.exp(rate * (s * K + k - (L_ - 1))) / total
            for acc, g in zip(tr, grads_of(lam * w * -ce(reference, micro(bundle, "tr", 0)), params), strict=True):
                acc += g
        delta = [p.detach() - t for p, t in zip(params, theta, strict=True)]
        with torch.no_grad():
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
        retain = grads_of(ce(reference, micro(bundle, "retain", 0)), params)
        with torch.no_grad():
            for p, t, r, g in zip(params, theta, retain, tr, strict=True):
                p.copy_(t - outer_lr * (r + g))
    for (name, p), e in zip(module.model.named_parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-6, atol=1e-8,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_full_pool_state_with_optimizer_round_trips_through_a_checkpoint(tmp_path):
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[adamw(schedule="warmup_cosine", warmup_steps=1)],
                    persistent_pool=2, persistent_horizon=10, persistent_state="full")
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), tokenizer=tok)
    bundles = [random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=s) for s in (1, 2, 3)]
    t = trainer(3)
    t.fit(module, DataLoader(bundles, batch_size=None))
    t.save_checkpoint(tmp_path / "a.ckpt")
    fresh = TARModule(copy.deepcopy(model), cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), tokenizer=tok)
    fresh.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=True))
    assert len(fresh.adversary_pool) == len(module.adversary_pool) > 0
    assert any(e.steps > 2 for e in module.adversary_pool.entries)  # a continued entry is among them
    for a, b in zip(fresh.adversary_pool.entries, module.adversary_pool.entries, strict=True):
        assert (a.adversary, a.lr, a.steps) == (b.adversary, b.lr, b.steps)
        assert all(torch.equal(x, y) for x, y in zip(a.delta, b.delta, strict=True))
        assert a.optimizer["scheduler"] == b.optimizer["scheduler"]
        assert a.optimizer["groups"] == b.optimizer["groups"]
        for sa, sb in zip(a.optimizer["state"], b.optimizer["state"], strict=True):
            assert sorted(sa) == sorted(sb) == ["exp_avg", "exp_avg_sq", "step"]
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _fsdp2_optimizer_state_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: AdamW over FSDP2-sharded weights, 2 steps; its state through optimizer_state, a weights-only
    torch.save/load and load_optimizer_state into a fresh AdamW; both take the same third step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))

        def step(opt):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for _ in range(2):
            step(opt)
            sched.step()
        path = os.path.join(out, f"state.{rank}.pt")
        torch.save(optimizer_state(opt, params, sched, device="cpu"), path)
        start = [p.to_local().detach().clone() for p in params]
        step(opt)
        continued = [p.to_local().detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.to_local().copy_(s)
        fresh = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda t: 1.0 / (1 + t))
        load_optimizer_state(fresh, params, torch.load(path, weights_only=True), fresh_sched)
        assert all(isinstance(fresh.state[p]["exp_avg"], DTensor) for p in params)
        assert fresh_sched.last_epoch == 2 and fresh.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
        step(fresh)
        for a, b in zip(continued, [p.to_local() for p in params], strict=True):
            assert torch.equal(a, b)
        torch.save({"ok": True}, os.path.join(out, f"ok.{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_optimizer_state_of_fsdp2_shards_round_trips_per_rank(tmp_path):
    """Under FSDP2 the stored adversary state is each rank's local shards; continued from a checkpointed copy it
    steps exactly as the original optimizer (bit-identical), with DTensor moments of the parameter's mesh."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_fsdp2_optimizer_state_worker, args=(2, port, str(tmp_path)), nprocs=2)
    assert all((tmp_path / f"ok.{r}.pt").exists() for r in range(2))
