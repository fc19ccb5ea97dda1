"""The TAR outer step against an independent fp64 reference: a plain autograd loop written here.

Every configuration runs real outer steps of :class:`TARModule` through ``lightning.Trainer.fit`` on a fp64
tiny Llama, and the same steps are recomputed on an independent copy of the model with ``torch.autograd.grad``
and hand-written formulas: the losses (next-token CE, max-entropy under each masking mode, the representation
term), the TR weights (uniform, exponential, normalised), the adversary optimizers (SGD, AdamW with bias
correction and linear warmup), LoRA (the adapted layers run as ``W + (alpha/r)·B·A``), the retain→forget
switch, the persistent pool, the clip by global norm and the outer optimizer (SGD, AdamW). Nothing of the
library computes the expectation: only the data (``conftest.random_bundle``), the model constructor and,
for the LoRA adapters' random initial ``A``, the module's seeding call (copied here) and peft's initialiser
are shared.

What one outer step computes (first order), for trajectories t < T of K adversary steps each::

    θ'_{t,0} = θ (θ + δ for a continued persistent trajectory)
    θ'_{t,k+1} = adversary step from θ'_{t,k} on micro-batch t·K+k (of the switch's stream before the switch)
    g = Σ_t Σ_{k ∈ points} λ_TR · w_k / T · ∇L_TR(θ'_{t,k+1}; tr micro-batch t)
        + λ_ret · ∇L_ret(θ; retain micro-batch 0)
    g ← g · min(1, c / (‖g‖ + 1e-6)) when clipping;  θ ← outer optimizer step with g
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import lightning as L
import numpy as np
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, TARConfig, TARModule
from tar_lightning.models import tiny_llama

# fp64 model, but Hugging Face's LlamaRMSNorm computes in fp32 (it casts the hidden states to fp32 and back):
# the forward passes below are the same code on (nearly) the same weights, and where the library's and this
# file's formulas round differently at the ~1e-16 level, an fp32 rounding inside a norm can flip, giving
# differences of ~1e-9 on updates of ~1e-3..1e-2 (measured: <= 3e-16 after one step; a second or third step
# starts from weights ~1e-17 apart and shows up to 6.1e-9, 32% of the tolerance, in representation_norm's
# embeddings, whose gradients are large: embeddings of std 0.02 feed an RMSNorm).
# rtol 1e-6 / atol 1e-8 (as tests/test_tar_module.py's hand computation) sit above that and several orders of
# magnitude below every update and every TR contribution (both asserted below).
RTOL, ATOL = 1e-6, 1e-8

SEED = 0
ADV_LR = 0.05  # SGD adversary (full and LoRA)
ADAMW_ADV = dict(lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=3)
OUTER_LR = 0.1  # outer SGD
OUTER_ADAMW = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
LAM_TR, LAM_RET = 2.0, 0.7
RATE = 0.5  # exponential weighting rate: large, so that the weights of a K=4 trajectory clearly differ
REP_W = 0.2
LORA = dict(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
IGNORE = -100


@dataclass
class Case:
    """One configuration of the outer step (the names match the test ids)."""

    id: str
    T: int = 1
    K: int = 1
    tr_every: int = 1
    tr_loss: str = "neg_ce"  # or "max_entropy"
    positions: str = "attention"  # max-entropy masking mode
    weighting: str = "uniform"
    normalize: bool = False
    adversary: str = "sgd"  # "sgd", "adamw_warmup", "lora"
    switch: Optional[float] = None  # retain→forget switch fraction
    clip_fraction: Optional[float] = None  # clip at this fraction of the first step's gradient norm
    representation: Optional[str] = None  # "norm" or "squared"
    outer: str = "sgd"  # or "adamw"
    outer_steps: int = 1
    persistent: bool = False


CASES = [
    Case("T1-K1-every1-negce-uniform"),
    Case("T3-K4-every2-negce-exponential", T=3, K=4, tr_every=2, weighting="exponential"),
    Case("T1-K4-every1-negce-exponential_normalized", K=4, weighting="exponential", normalize=True),
    Case("T3-K4-every1-maxent_attention-uniform", T=3, K=4, tr_loss="max_entropy", positions="attention"),
    Case("T1-K4-every2-maxent_labels-exponential", K=4, tr_every=2, tr_loss="max_entropy", positions="labels",
         weighting="exponential"),
    Case("T3-K1-every1-maxent_all-exponential_normalized", T=3, tr_loss="max_entropy", positions="all",
         weighting="exponential", normalize=True),
    Case("clip-T3-K4-every2-maxent_attention", T=3, K=4, tr_every=2, tr_loss="max_entropy",
         clip_fraction=0.3),
    Case("adamw_warmup_adversary-T3-K4-every1", T=3, K=4, adversary="adamw_warmup", weighting="exponential"),
    Case("lora_adversary-T3-K4-every2", T=3, K=4, tr_every=2, adversary="lora", tr_loss="max_entropy"),
    Case("switch_retain_to_forget-T3-K4-every1", T=3, K=4, switch=0.5),
    Case("outer_adamw-T3-K4-every2-2steps", T=3, K=4, tr_every=2, outer="adamw", outer_steps=2,
         weighting="exponential"),
    Case("representation_norm-T1-K4-every2-2steps", K=4, tr_every=2, representation="norm", outer_steps=2),
    Case("representation_squared-T3-K1-every1-2steps", T=3, representation="squared", outer_steps=2,
         tr_loss="max_entropy"),
    # step 0 stores the trajectory, step 1 continues it (no switch: the adversary's own data), which reaches
    # the horizon 2K and is retired, so step 2 starts a fresh trajectory (with the switch again)
    Case("persistent_pool-T1-K4-every2-switch-3steps", K=4, tr_every=2, switch=0.5, persistent=True,
         outer_steps=3),
]


# -- the library run ---------------------------------------------------------------------------------------


def library_config(case: Case, clip: Optional[float]) -> TARConfig:
    switch = {"retain_stream": "retain_domain", "fraction": case.switch} if case.switch is not None else None
    if case.adversary == "sgd":
        adversary = AdversaryConfig(name="sgd", optimizer="sgd", optimizer_kwargs={"momentum": 0.0},
                                    lr=ADV_LR, weight_decay=0.0, switch=switch)
    elif case.adversary == "adamw_warmup":
        a = ADAMW_ADV
        adversary = AdversaryConfig(name="adamw", optimizer="adamw", lr=a["lr"],
                                    weight_decay=a["weight_decay"],
                                    optimizer_kwargs={"betas": a["betas"], "eps": a["eps"]},
                                    schedule="linear_warmup", warmup_steps=a["warmup"], switch=switch)
    else:
        adversary = AdversaryConfig(name="lora", method="lora", optimizer="sgd",
                                    optimizer_kwargs={"momentum": 0.0}, lr=ADV_LR, weight_decay=0.0,
                                    lora=dict(LORA), switch=switch)
    return TARConfig(
        inner_steps=case.K, tr_every=case.tr_every, trajectories=case.T, tr_loss=case.tr_loss,
        entropy_positions=case.positions, tr_weight=LAM_TR, retain_weight=LAM_RET, weighting=case.weighting,
        weighting_rate=RATE, normalize_weights=case.normalize,
        retain_representation=case.representation is not None, representation_weight=REP_W,
        representation_squared=case.representation == "squared",
        adversaries=[adversary], clip_grad_norm=clip, persistent_pool=1 if case.persistent else 0,
        persistent_probability=1.0, persistent_horizon=2 * case.K, seed=SEED,
    )


def outer_optimizer(case: Case):
    if case.outer == "sgd":
        return lambda p: torch.optim.SGD(p, lr=OUTER_LR)
    a = OUTER_ADAMW
    return lambda p: torch.optim.AdamW(p, lr=a["lr"], betas=a["betas"], eps=a["eps"],
                                       weight_decay=a["weight_decay"])


def library_run(model, tok, case: Case, bundles: list, clip: Optional[float]) -> dict[str, torch.Tensor]:
    module = TARModule(model, library_config(case, clip), optimizer=outer_optimizer(case), tokenizer=tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=len(bundles),
                        log_every_n_steps=1)
    trainer.fit(module, DataLoader(bundles, batch_size=None))
    assert trainer.global_step == len(bundles)
    if case.persistent:  # the continued trajectory reached the horizon and was retired; step 2 stored anew
        assert len(module.adversary_pool) == 1 and module.adversary_pool.entries[0].steps == case.K
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


# -- the reference: formulas written out ---------------------------------------------------------------------


def micro(bundle: dict, stream: str, i: int) -> dict:
    return {k: v[i] for k, v in bundle[stream].items()}


def forward(model, mb: dict, weights: Optional[dict] = None, hidden: bool = False):
    kwargs = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False,
                  output_hidden_states=hidden)
    if weights is None:
        return model(**kwargs)
    return torch.func.functional_call(model, weights, args=(), kwargs=kwargs)


def cross_entropy(logits, labels):
    """Mean over labelled positions of -log p(labels[t+1] | ..t)."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def neg_entropy(logits, mb: dict, positions: str):
    """Minus the mean predictive entropy over the positions of the masking mode."""
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if positions == "attention":  # non-padding positions
        mask = mb["attention_mask"] != 0
    elif positions == "labels":  # positions whose next token is labelled (never the last)
        mask = torch.zeros_like(mb["labels"], dtype=torch.bool)
        mask[:, :-1] = mb["labels"][:, 1:] != IGNORE
    else:  # "all": padding included
        mask = torch.ones_like(mb["labels"], dtype=torch.bool)
    assert positions in ("attention", "labels", "all")
    return -(entropy * mask).sum() / mask.sum()


def tr_objective(case: Case, logits, mb: dict):
    if case.tr_loss == "neg_ce":
        return -cross_entropy(logits, mb["labels"])
    return neg_entropy(logits, mb, case.positions)


def tr_weights(case: Case) -> tuple[list[int], list[float]]:
    """The TR points k (after the (k+1)-th adversary step, every tr_every) and their weights."""
    points = [k for k in range(case.K) if (k + 1) % case.tr_every == 0]
    if case.weighting == "uniform":
        w = [1.0 / len(points) for _ in points]
    else:  # exp(rate·(k − (K−1))): the last point weighs 1, earlier ones less
        w = [math.exp(RATE * (k - (case.K - 1))) for k in points]
    if case.normalize:
        w = [x / sum(w) for x in w]
    return points, w


def representation(hidden, ref_hidden, attention_mask, squared: bool):
    """Mean over the hidden-state tensors (embedding output included) of the mean over non-padding tokens of
    ‖h − h_ref‖₂ (or its square).

    In fp32, as the library documents its loss (an fp32 tensor): the fp64 hidden states are rounded to fp32
    before the difference, as there. One outer step after the start h − h_ref is small next to h, so that
    rounding is a relatively large error of the difference (done in fp64 here, the squared case differs from
    the library by ~1.5e-8, more than half the tolerance; rounded alike, by ~1e-16). The rest is this file's
    maths.
    """
    mask = (attention_mask != 0).to(torch.float32)
    per_layer = []
    for h, h_ref in zip(hidden, ref_hidden, strict=True):
        d = h.to(torch.float32) - h_ref.detach().to(torch.float32)
        sq = (d * d).sum(-1)
        # ‖d‖ with the subgradient 0 at d = 0 (at the start the policy is the reference: every d is 0)
        per_token = sq if squared else torch.where(sq > 0, sq.clamp(min=1e-30).sqrt(), torch.zeros_like(sq))
        per_layer.append((per_token * mask).sum() / mask.sum())
    return sum(per_layer) / len(per_layer)


def lora_initial_a(model, step: int, t: int) -> dict[str, torch.Tensor]:
    """The initial adapter ``A`` of every LoRA target (``B`` starts at zero) of trajectory t of an outer step.

    Reproducing it needs the module's seeding (copied from ``TARModule.training_step`` / ``step_generator``:
    the trajectory's generator from SeedSequence([seed, step, t]), one draw for the adversary choice, then the
    init seed) and peft's initialiser run under that seed on a copy of the model; only ``A``'s values are
    taken from it.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    state = np.random.SeedSequence([SEED, step, t]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    torch.multinomial(torch.tensor([1.0], dtype=torch.float64), 1, generator=gen)  # sample_adversary's draw
    init_seed = int(torch.randint(2**62, (1,), generator=gen))
    copy_ = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        LoraModel(copy_, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                    target_modules=LORA["targets"], bias="none"), "tar_adversary")
    return {
        f"{name}.weight": module.lora_A["tar_adversary"].weight.detach().clone()
        for name, module in copy_.named_modules()
        if hasattr(module, "lora_A") and "tar_adversary" in module.lora_A
    }


class Reference:
    """The outer steps of a case, by hand, on its own copy of the model."""

    def __init__(self, model, case: Case) -> None:
        self.case = case
        self.model = copy.deepcopy(model)
        self.frozen = copy.deepcopy(model).requires_grad_(False) if case.representation else None
        self.initial = copy.deepcopy(model)  # for the LoRA seeding only
        self.named = dict(self.model.named_parameters())
        self.params = list(self.named.values())
        self.points, self.weights = tr_weights(case)
        self.pool: Optional[dict] = None  # persistent pool of size 1: {"delta", "steps"}
        self.outer_m = [torch.zeros_like(p) for p in self.params]
        self.outer_v = [torch.zeros_like(p) for p in self.params]
        self.clip: Optional[float] = None
        self.tr_max = 0.0  # the largest element of λ_TR·Σ w_k/T ∇L_TR seen, to show the TR term matters
        self.rep_values: list[float] = []  # the representation term of each outer step

    def grads(self, loss, wrt) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(wrt, torch.autograd.grad(loss, wrt, allow_unused=True), strict=True)]

    # one trajectory: adversary steps, TR gradients (accumulated into tr) at the TR points
    def trajectory(self, bundle: dict, step: int, t: int, continued: bool, tr: list[torch.Tensor]) -> None:
        case, K = self.case, self.case.K
        switch_at = 0 if continued or case.switch is None else math.floor(case.switch * K + 1e-9)
        tr_mb = micro(bundle, "tr", t)
        lora = case.adversary == "lora"
        if lora:
            s = LORA["alpha"] / LORA["rank"]
            a_init = lora_initial_a(self.initial, step, t)
            assert sorted(a_init) == sorted(n for n in self.named if n.split(".")[-2] in LORA["targets"])
            A = {n: a.clone().requires_grad_(True) for n, a in a_init.items()}
            B = {n: torch.zeros(self.named[n].shape[0], LORA["rank"], dtype=a.dtype, requires_grad=True)
                 for n, a in a_init.items()}
            adapters = list(A.values()) + list(B.values())
        m = [torch.zeros_like(p) for p in self.params]
        v = [torch.zeros_like(p) for p in self.params]
        e = 0
        for k in range(K):
            mb = micro(bundle, "retain_domain" if k < switch_at else "forget", t * K + k)
            if lora:  # the adapted layers compute x·(W + s·B·A)ᵀ; only A and B train
                weights = {n: self.named[n].detach() + s * B[n] @ A[n] for n in A}
                g = self.grads(cross_entropy(forward(self.model, mb, weights).logits, mb["labels"]), adapters)
                with torch.no_grad():
                    for a, ga in zip(adapters, g, strict=True):
                        a -= ADV_LR * ga
            else:
                g = self.grads(cross_entropy(forward(self.model, mb).logits, mb["labels"]), self.params)
                with torch.no_grad():
                    if case.adversary == "sgd":
                        for p, gp in zip(self.params, g, strict=True):
                            p -= ADV_LR * gp
                    else:  # AdamW, linear warmup: step k runs at lr·min(k/W, 1); bias-corrected moments
                        a = ADAMW_ADV
                        lr = a["lr"] * min(k / a["warmup"], 1.0)
                        b1, b2 = a["betas"]
                        n = k + 1
                        for p, gp, mp, vp in zip(self.params, g, m, v, strict=True):
                            p *= 1.0 - lr * a["weight_decay"]
                            mp.copy_(b1 * mp + (1 - b1) * gp)
                            vp.copy_(b2 * vp + (1 - b2) * gp * gp)
                            m_hat, v_hat = mp / (1 - b1**n), vp / (1 - b2**n)
                            p -= lr * m_hat / (v_hat.sqrt() + a["eps"])
            if k in self.points:  # after the adversary's step k: the attacked weights θ'_{k+1}
                scale = LAM_TR * self.weights[e] / case.T
                weights = {n: self.named[n] + s * B[n].detach() @ A[n].detach() for n in A} if lora else None
                logits = forward(self.model, tr_mb, weights).logits
                grads = self.grads(scale * tr_objective(case, logits, tr_mb), self.params)
                for acc, gt in zip(tr, grads, strict=True):
                    acc += gt
                e += 1
        assert e == len(self.points)

    def outer_step(self, bundle: dict, step: int) -> None:
        case = self.case
        theta = [p.detach().clone() for p in self.params]
        tr = [torch.zeros_like(p) for p in self.params]
        for t in range(case.T):
            continued = case.persistent and self.pool is not None
            if continued:  # start where the stored trajectory ended: θ + δ
                with torch.no_grad():
                    for p, d in zip(self.params, self.pool["delta"], strict=True):
                        p += d
            self.trajectory(bundle, step, t, continued, tr)
            with torch.no_grad():
                if case.persistent:
                    delta = [p.detach() - p0 for p, p0 in zip(self.params, theta, strict=True)]
                    steps = (self.pool["steps"] if continued else 0) + case.K
                    self.pool = {"delta": delta, "steps": steps} if steps < 2 * case.K else None
                for p, p0 in zip(self.params, theta, strict=True):
                    p.copy_(p0)
        self.tr_max = max(self.tr_max, max(float(g.abs().max()) for g in tr))

        mb = micro(bundle, "retain", 0)
        out = forward(self.model, mb, hidden=case.representation is not None)
        retain = cross_entropy(out.logits, mb["labels"])
        if case.representation:
            with torch.no_grad():
                ref_hidden = forward(self.frozen, mb, hidden=True).hidden_states
            rep = representation(out.hidden_states, ref_hidden, mb["attention_mask"],
                                 squared=case.representation == "squared")
            self.rep_values.append(float(rep))
            retain = retain + REP_W * rep
        g = [gt + gr for gt, gr in zip(tr, self.grads(LAM_RET * retain, self.params), strict=True)]

        norm = math.sqrt(sum(float((x * x).sum()) for x in g))
        if case.clip_fraction is not None:
            if self.clip is None:
                self.clip = case.clip_fraction * norm
            coef = min(1.0, self.clip / (norm + 1e-6))
            assert coef < 0.5  # the clip is active
            g = [x * coef for x in g]

        with torch.no_grad():
            if case.outer == "sgd":
                for p, x in zip(self.params, g, strict=True):
                    p -= OUTER_LR * x
            else:  # AdamW: decoupled decay, bias-corrected moments
                a = OUTER_ADAMW
                b1, b2 = a["betas"]
                n = step + 1
                for p, x, mp, vp in zip(self.params, g, self.outer_m, self.outer_v, strict=True):
                    p *= 1.0 - a["lr"] * a["weight_decay"]
                    mp.copy_(b1 * mp + (1 - b1) * x)
                    vp.copy_(b2 * vp + (1 - b2) * x * x)
                    p -= a["lr"] * (mp / (1 - b1**n)) / ((vp / (1 - b2**n)).sqrt() + a["eps"])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_outer_step_matches_independent_fp64_reference(case: Case):
    model, tok = tiny_llama()
    model = model.double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = library_config(case, None).stream_steps()  # the streams and micro-batch counts the config needs
    expected_streams = {"retain": 1, "tr": case.T, "forget": case.T * case.K}
    if case.switch is not None:
        expected_streams["retain_domain"] = case.T * case.K
    assert probe == expected_streams
    bundles = [random_bundle(len(tok), expected_streams, batch=2, length=10, seed=10 + s)
               for s in range(case.outer_steps)]

    reference = Reference(model, case)
    for step, bundle in enumerate(bundles):
        reference.outer_step(bundle, step)
    expected = {n: p.detach() for n, p in reference.model.named_parameters()}

    got = library_run(model, tok, case, bundles, reference.clip)

    assert list(got) == list(expected)
    worst, share, moved = 0.0, 0.0, 0.0
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{case.id}: {name}: {m}")
        diff = (value - expected[name]).abs()
        worst = max(worst, float(diff.max()))
        share = max(share, float((diff / (ATOL + RTOL * expected[name].abs())).max()))
        moved = max(moved, float((expected[name] - start[name]).abs().max()))
    print(f"{case.id}: max |library - reference| = {worst:.2e} ({share:.1%} of the tolerance), "
          f"max |update| = {moved:.2e}, max |TR gradient| = {reference.tr_max:.2e}")
    if case.representation:  # zero at the start (the reference is the starting policy), then it acts
        assert reference.rep_values[0] == 0.0 and reference.rep_values[-1] > 1e-3
    # the update is not trivially zero, and the TR term is not negligible next to the tolerance
    assert moved > 1e4 * ATOL
    assert reference.tr_max * (OUTER_LR if case.outer == "sgd" else 1.0) > 1e3 * ATOL


@pytest.mark.parametrize("mapped", [True, False], ids=["tr_stream_by_data", "without_the_mapping"])
def test_tr_stream_by_data_measures_tr_on_the_stream_of_the_adversarys_data(mapped: bool):
    """``tr_stream_by_data``: a trajectory's TR loss is taken on the stream its adversary's data maps to. The
    library's batches hold the reference's TR micro-batches under another name (``held_out``) and unrelated random
    text as ``tr``; with ``{forget: held_out}`` the library must match the hand-written reference (which reads its
    own TR batches), and without it, reading ``tr``, it must not (so the comparison can tell the streams apart)."""
    case = Case("mapped", T=3, K=4, tr_every=2, tr_loss="max_entropy", weighting="exponential")
    model, tok = tiny_llama()
    model = model.double()
    streams = {"retain": 1, "tr": case.T, "forget": case.T * case.K}
    bundle = random_bundle(len(tok), streams, batch=2, length=10, seed=10)
    other = random_bundle(len(tok), {"tr": case.T}, batch=2, length=10, seed=99)["tr"]
    reference = Reference(model, case)
    reference.outer_step(bundle, 0)
    expected = {n: p.detach() for n, p in reference.model.named_parameters()}

    config = library_config(case, None)
    if mapped:
        config.tr_stream_by_data = {"forget": "held_out"}
        config.validate()
        assert config.stream_steps() == {"retain": 1, "held_out": case.T, "forget": case.T * case.K}
    library_bundle = {**bundle, "held_out": bundle["tr"], "tr": other}
    module = TARModule(model, config, optimizer=outer_optimizer(case), tokenizer=tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=1)
    trainer.fit(module, DataLoader([library_bundle], batch_size=None))
    got = dict(module.model.named_parameters())
    close = all(torch.allclose(got[n], expected[n], rtol=RTOL, atol=ATOL) for n in expected)
    assert close == mapped
