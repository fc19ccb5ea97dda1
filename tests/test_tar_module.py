"""TARModule: the outer step against a hand computation, restore, bookkeeping, LoRA, architectures."""

import copy

import lightning as L
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, ConfigError, TARConfig, TARModule
from tar_lightning.adversaries import AdversaryRun
from tar_lightning.losses import causal_lm_loss
from tar_lightning.models import TINY_ARCHITECTURES, tiny_llama, tiny_model
from tar_lightning.snapshot import ParameterSnapshot


def make_trainer(**kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=1,
        log_every_n_steps=1,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


def fit(module: TARModule, batches: list, **trainer_kw) -> L.Trainer:
    trainer = make_trainer(max_steps=len(batches), **trainer_kw)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def sgd_adversary(lr: float, **kw) -> AdversaryConfig:
    return AdversaryConfig(
        name="sgd", data="forget", optimizer="sgd", optimizer_kwargs={"momentum": 0.0}, lr=lr, weight_decay=0.0, **kw
    )


def lm_ce(model, mb):
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
    return causal_lm_loss(out.logits, mb["labels"])


def micro(bundle, stream, i):
    return {k: v[i] for k, v in bundle[stream].items()}


@pytest.mark.parametrize("inner_steps,tr_every", [(1, 1), (3, 1), (4, 2)])
def test_outer_step_equals_first_order_hand_computation(inner_steps, tr_every):
    """θ_new = θ − η(λ_ret ∇L_ret(θ) + λ_TR Σ_k w_k ∇L_TR(θ'_k)), with θ'_k from K plain SGD steps."""
    model, tok = tiny_llama()
    model = model.double()
    reference = copy.deepcopy(model)
    adv_lr, outer_lr, lam_tr, lam_ret = 0.05, 0.1, 2.0, 0.7
    cfg = TARConfig(
        inner_steps=inner_steps,
        tr_every=tr_every,
        tr_loss="neg_ce",
        weighting="uniform",
        tr_weight=lam_tr,
        retain_weight=lam_ret,
        adversaries=[sgd_adversary(adv_lr)],
    )
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=outer_lr), tokenizer=tok)
    bundle = random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=1)

    # -- the expected update, computed with plain autograd on an independent copy ------------------------
    params = [p for p in reference.parameters()]
    theta0 = [p.detach().clone() for p in params]
    n_eval = inner_steps // tr_every
    tr_grad = [torch.zeros_like(p) for p in params]
    for k in range(inner_steps):
        grads = torch.autograd.grad(lm_ce(reference, micro(bundle, "forget", k)), params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p -= adv_lr * g
        if (k + 1) % tr_every == 0:
            # scaled before differentiation, as the module does: the same maths, the same rounding order
            loss = lam_tr * (1.0 / n_eval) * -lm_ce(reference, micro(bundle, "tr", 0))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(tr_grad, grads, strict=True):
                if g is not None:
                    acc += g
    with torch.no_grad():
        for p, t0 in zip(params, theta0, strict=True):
            p.copy_(t0)
    ret_grads = torch.autograd.grad(lam_ret * lm_ce(reference, micro(bundle, "retain", 0)), params, allow_unused=True)
    expected = []
    for t0, gr, gt in zip(theta0, ret_grads, tr_grad, strict=True):
        gr = torch.zeros_like(t0) if gr is None else gr
        expected.append(t0 - outer_lr * (gr + gt))

    fit(module, [bundle])
    got = list(module.model.parameters())
    assert len(got) == len(expected)
    for (name, _), g, e in zip(module.model.named_parameters(), got, expected, strict=True):
        # fp64 model, but HF's RMSNorm computes in fp32: so a few elements differ by ~1e-9 (updates are ~1e-2)
        torch.testing.assert_close(g.detach(), e, rtol=1e-6, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
    # the update is not trivially zero
    assert any(not torch.equal(g.detach(), t0) for g, t0 in zip(got, theta0, strict=True))


def test_exponential_weights_follow_the_paper():
    cfg = TARConfig(inner_steps=64, tr_every=4, weighting="exponential", weighting_rate=0.0625)
    assert cfg.tr_points() == list(range(3, 64, 4))
    w = cfg.tr_weights()
    assert w[-1] == pytest.approx(1.0)
    assert w[0] == pytest.approx(torch.exp(torch.tensor(-0.0625 * 60)).item())
    assert sum(w) == pytest.approx(4.438, abs=1e-3)
    norm = TARConfig(inner_steps=64, tr_every=4, normalize_weights=True).tr_weights()
    assert sum(norm) == pytest.approx(1.0)


def test_restore_is_bit_exact_after_an_attack():
    model, tok = tiny_llama()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    snap = ParameterSnapshot(params)
    bundle = random_bundle(len(tok), {"forget": 3}, seed=3)
    adv = AdversaryConfig(name="adamw", lr=1e-2)
    with AdversaryRun(model, adv, lr=1e-2, steps=3) as run:
        for k in range(3):
            run.step(micro(bundle, "forget", k))
    assert not snap.matches()
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    snap.restore()
    assert snap.matches()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_outer_step_with_zero_lr_leaves_weights_bit_identical():
    model, tok = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TARConfig(inner_steps=4, tr_every=2, adversaries=[AdversaryConfig(lr=[1e-2, 3e-2])])
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), tokenizer=tok)
    fit(module, [random_bundle(len(tok), cfg.stream_steps(), seed=s) for s in range(2)])
    assert all(torch.equal(p, b) for p, b in zip(module.model.parameters(), before, strict=True))


def test_every_parameter_changes_and_global_step_counts_outer_steps(tmp_path):
    model, tok = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TARConfig(inner_steps=4, tr_every=2, adversaries=[AdversaryConfig(lr=1e-3)], clip_grad_norm=1.0)
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    batches = [random_bundle(len(tok), cfg.stream_steps(), seed=s) for s in range(3)]
    trainer = fit(module, batches, default_root_dir=tmp_path)
    assert trainer.global_step == 3
    unchanged = [n for n, p in module.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    metrics = trainer.callback_metrics  # log_every_n_steps=1: the per-inner-step curves are logged every step
    for key in ("train/retain_loss", "train/tr_loss", "train/entropy_last", "train/adv_loss/k000",
                "train/adv_loss/k003", "train/tr_loss/k001", "train/tr_loss/k003", "train/grad_norm_tr",
                "train/grad_norm"):
        assert key in metrics, key
        assert torch.isfinite(metrics[key])


def test_schedule_free_default_optimizer_and_checkpoint_without_inner_state(tmp_path):
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(lr=1e-3)])
    module = TARModule(model, cfg, tokenizer=tok)  # default: schedule-free AdamW
    batches = [random_bundle(len(tok), cfg.stream_steps(), seed=s) for s in range(2)]
    trainer = fit(module, batches, default_root_dir=tmp_path)
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == "AdamWScheduleFree"
    assert opt.param_groups[0]["train_mode"] is False  # fit() leaves the evaluation point in the weights
    ckpt_path = tmp_path / "tar.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert len(ckpt["optimizer_states"]) == 1
    n_params = len(list(module.trainable_parameters()))
    assert len(ckpt["optimizer_states"][0]["state"]) == n_params
    assert ckpt["global_step"] == trainer.global_step == 2
    assert not any("reference_model" in k for k in ckpt["state_dict"])
    assert "tar_lightning" in ckpt and "tokenizer_files" in ckpt["tar_lightning"]


def test_lora_adversary_leaves_no_adapter_and_sends_tr_gradient_to_base_weights():
    model, tok = tiny_llama()
    names = [n for n, _ in model.named_parameters()]
    ids = [id(p) for p in model.parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = AdversaryConfig(name="lora", method="lora", lr=1e-2, lora={"rank": 4, "alpha": 8.0})
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[lora])
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=1e-2), tokenizer=tok)
    trainer = fit(module, [random_bundle(len(tok), cfg.stream_steps(), seed=0)])
    assert [n for n, _ in module.model.named_parameters()] == names
    assert [id(p) for p in module.model.parameters()] == ids
    assert not any("lora" in n.lower() for n, _ in module.model.named_modules())
    assert not hasattr(module.model, "peft_config")
    assert all(p.requires_grad for p in module.model.parameters())
    assert trainer.callback_metrics["train/grad_norm_tr"] > 0
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_lora_targets_matching_nothing_is_a_clear_error():
    model, tok = tiny_llama()
    adv = AdversaryConfig(name="lora", method="lora", lr=1e-3, lora={"targets": ["no_such_proj"]})
    with pytest.raises(ConfigError, match="no_such_proj"):
        AdversaryRun(model, adv, lr=1e-3, steps=2)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tar_step_on_each_architecture(arch):
    model, tok = tiny_model(arch)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TARConfig(inner_steps=2, tr_every=1, retain_representation=True, adversaries=[AdversaryConfig(lr=1e-3)])
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    trainer = fit(module, [random_bundle(len(tok), cfg.stream_steps(), seed=0)])
    assert trainer.global_step == 1
    assert all(not torch.equal(p.detach(), b) for p, b in zip(module.model.parameters(), before, strict=True))
    assert "train/retain_representation" in trainer.callback_metrics


def test_retain_to_forget_switch_uses_both_streams():
    model, tok = tiny_llama()
    adv = AdversaryConfig(name="r2f", lr=1e-3, switch={"retain_stream": "retain_domain", "fraction": 0.5})
    cfg = TARConfig(inner_steps=4, tr_every=2, adversaries=[adv])
    assert cfg.stream_steps() == {"retain": 1, "tr": 1, "forget": 4, "retain_domain": 4}
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), tokenizer=tok)
    fit(module, [random_bundle(len(tok), cfg.stream_steps(), seed=0)])


@pytest.mark.parametrize(
    "trainer_kw,match",
    [({"gradient_clip_val": 1.0}, "gradient_clip_val"), ({"accumulate_grad_batches": 2}, "accumulate_grad_batches")],
)
def test_trainer_level_clipping_and_accumulation_are_refused(trainer_kw, match):
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=1, tr_every=1)
    module = TARModule(model, cfg, tokenizer=tok)
    with pytest.raises(ConfigError, match=match):
        fit(module, [random_bundle(len(tok), cfg.stream_steps())], **trainer_kw)


def test_missing_stream_is_a_clear_error():
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1)
    module = TARModule(model, cfg, tokenizer=tok)
    bundle = random_bundle(len(tok), {"retain": 1, "forget": 2})
    with pytest.raises(ConfigError, match="'tr'"):
        fit(module, [bundle])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"inner_steps": 4, "tr_every": 8}, "tr_every"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"tr_loss": "entropy"}, "tr_loss"),
        ({"weighting": "linear"}, "weighting"),
        ({"adversaries": []}, "adversaries"),
        ({"adversaries": [AdversaryConfig(optimizer="adamww")]}, "adamww"),
        ({"adversaries": [AdversaryConfig(schedule="cosine_forever")]}, "cosine_forever"),
        ({"adversaries": [AdversaryConfig(lr=[])]}, "lr"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TARConfig(**kwargs).validate()


@pytest.mark.slow
def test_tar_step_on_the_real_smollm2_model():
    """One outer step (K=2, LoRA and full adversaries) on the real pretrained SmolLM2-135M-Instruct."""
    from tar_lightning.models import decoder_layer_class, load_model

    model, tok = load_model("smollm2-135m-instruct")
    assert decoder_layer_class(model).__name__ == "LlamaDecoderLayer"
    names = [n for n, _ in model.named_parameters()]
    cfg = TARConfig(
        inner_steps=2,
        tr_every=1,
        retain_representation=True,
        adversaries=[AdversaryConfig(name="full", lr=1e-5), AdversaryConfig(name="lora", method="lora", lr=1e-4)],
    )
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5), tokenizer=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [random_bundle(len(tok), cfg.stream_steps(), batch=1, length=24, seed=s) for s in range(2)]
    trainer = fit(module, batches)
    assert trainer.global_step == 2
    assert [n for n, _ in module.model.named_parameters()] == names
    assert all(not torch.equal(p.detach(), before[n]) for n, p in module.model.named_parameters())
    assert torch.isfinite(trainer.callback_metrics["train/retain_loss"])


def test_schedule_free_modes_around_validation_inside_fit(tmp_path):
    """Validation mid-fit moves a schedule-free optimizer to its evaluation point and back before the next step."""
    from tar_lightning import DataSource, TARDataModule

    cfg = TARConfig(inner_steps=1, tr_every=1, adversaries=[AdversaryConfig(lr=1e-3)])
    module = TARModule("tiny-llama", cfg)  # default outer optimizer: schedule-free AdamW
    seen = []

    class Spy(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append(("val", trainer.optimizers[0].param_groups[0]["train_mode"]))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("train", trainer.optimizers[0].param_groups[0]["train_mode"]))

    src = {"path": "synthetic:forget", "synthetic": {"n": 32}}
    data = TARDataModule(
        streams={"retain": DataSource("synthetic:retain", synthetic={"n": 32}), "forget": DataSource(**src),
                 "tr": DataSource(**src)},
        val_streams={"heldout": DataSource(**src, limit=4)}, seq_len=32, batch_size=2,
    )
    trainer = make_trainer(max_steps=3, val_check_interval=1, num_sanity_val_steps=0, callbacks=[Spy()],
                           default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 3
    assert [mode for kind, mode in seen if kind == "train"] == [True, True, True]
    assert [mode for kind, mode in seen if kind == "val"] == [False, False, False, False, False, False]


def test_lora_adapter_init_follows_the_run_seed_not_the_global_rng():
    """Data-parallel ranks must start identical adapters: the init depends on the run's seed only."""
    adv = AdversaryConfig(name="lora", method="lora", lr=1e-3, lora={"rank": 4})

    def adapters(global_seed, run_seed):
        model, _ = tiny_llama()
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        run = AdversaryRun(model, adv, lr=1e-3, steps=1, seed=run_seed)
        weights = [p.detach().clone() for p in run.trainable]
        assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
        run.close()
        return weights

    a, b, c = adapters(1, 7), adapters(2, 7), adapters(1, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
