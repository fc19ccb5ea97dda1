"""RMUModule (the WMDP paper's RMU baseline): the loss against a hand computation, which parameters train, the
objective going down, reload from a checkpoint, the tiny recipe through the CLI, and option errors."""

from __future__ import annotations

import copy
import csv
import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import fit_under_fsdp2_overlay, random_bundle
from torch.utils.data import DataLoader

from tar_lightning import RMUModule
from tar_lightning.cli import main
from tar_lightning.errors import ConfigError
from tar_lightning.models import tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def _micro(bundle: dict, name: str) -> dict:
    return {k: v[0] for k, v in bundle[name].items()}


def test_loss_matches_a_hand_computation():
    """L = mean_tok ||h_l(forget) - c u||^2 / H + alpha * mean_tok ||h_l(retain) - h_l^frozen(retain)||^2 / H over
    non-padding tokens, with h_l the hidden state after decoder layer l (HF's hidden_states[l + 1]) and u the
    normalised uniform [0, 1) vector of the seed; everything recomputed here in fp64 from output_hidden_states."""
    torch.set_num_threads(1)
    model, tok = tiny_llama(num_hidden_layers=3)
    start = copy.deepcopy(model)  # the frozen reference, taken by this test itself
    layer, c, alpha, seed = 1, 3.0, 7.0, 5
    module = RMUModule(model, tokenizer=tok, layer=layer, steering_coeff=c, alpha=alpha, seed=seed)
    module.configure_model()
    with torch.no_grad():  # move the trained model away from the frozen copy, so the retain term is not 0
        g = torch.Generator().manual_seed(1)
        for p in module.model.model.layers[1].mlp.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    bundle = random_bundle(len(tok), module.stream_steps(), batch=3, length=10, seed=2, pad_last=4)
    forget, retain = _micro(bundle, "forget"), _micro(bundle, "retain")

    loss, parts = module.rmu_losses(forget, retain)

    def hidden(m, batch):
        with torch.no_grad():
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states[layer + 1].double()

    def masked_token_mean(sq, mask):  # sq: [B, T, H]
        total, count = 0.0, 0
        for b in range(sq.shape[0]):
            for t in range(sq.shape[1]):
                if mask[b, t]:
                    total += sq[b, t].sum().item() / sq.shape[2]
                    count += 1
        return total / count

    hidden_size = model.config.hidden_size
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u / u.norm()
    want_forget = masked_token_mean((hidden(module.model, forget) - c * u) ** 2, forget["attention_mask"])
    want_retain = masked_token_mean((hidden(module.model, retain) - hidden(start, retain)) ** 2,
                                    retain["attention_mask"])
    assert want_retain > 1e-6  # the perturbation is visible at layer 1
    assert parts["forget"].item() == pytest.approx(want_forget, rel=1e-5)
    assert parts["retain"].item() == pytest.approx(want_retain, rel=1e-4)
    assert loss.item() == pytest.approx(want_forget + alpha * want_retain, rel=1e-5)
    # padding counts for nothing: changing padded tokens leaves the loss unchanged
    forget2 = dict(forget, input_ids=forget["input_ids"].masked_fill(forget["attention_mask"] == 0, 7))
    assert module.rmu_losses(forget2, retain)[0].item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, trained", [
    ({"layer": 1}, {f"model.layers.{i}.mlp.{w}.weight" for i in (0, 1) for w in ("gate_proj", "up_proj", "down_proj")}),
    ({"layer": 2, "update_layers": [1], "update_module": "mlp.down_proj"}, {"model.layers.1.mlp.down_proj.weight"}),
], ids=["default_layers", "down_proj_of_one_layer"])
def test_only_the_chosen_parameters_change_after_a_step(kwargs, trained):
    torch.set_num_threads(1)
    model, tok = tiny_llama(num_hidden_layers=3)
    module = RMUModule(model, tokenizer=tok, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), steering_coeff=2.0,
                       alpha=10.0, **kwargs)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    bundle = random_bundle(len(tok), module.stream_steps(), batch=2, length=8)
    _trainer(1).fit(module, DataLoader([bundle], batch_size=None))
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == trained
    for n, p in module.frozen_model.named_parameters():  # the frozen copy holds the starting weights
        assert torch.equal(p, before[n]) and not p.requires_grad, n


def test_the_objective_decreases_over_a_few_steps():
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    module = RMUModule(model, tokenizer=tok, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), layer=1,
                       steering_coeff=2.0, alpha=10.0)
    bundle = random_bundle(len(tok), module.stream_steps(), batch=4, length=16, seed=0)
    forget, retain = _micro(bundle, "forget"), _micro(bundle, "retain")
    module.configure_model()
    with torch.no_grad():
        before, parts0 = module.rmu_losses(forget, retain)
    assert parts0["retain"].item() == 0.0  # the model starts at the frozen copy
    _trainer(15).fit(module, DataLoader([bundle] * 15, batch_size=None))
    with torch.no_grad():
        after, parts = module.rmu_losses(forget, retain)
    assert after.item() < 0.5 * before.item(), (before.item(), after.item(), parts)
    assert parts["forget"].item() < 0.5 * parts0["forget"].item()


def test_load_from_checkpoint_round_trip(tmp_path):
    torch.set_num_threads(1)
    module = RMUModule("tiny-llama", optimizer=lambda p: torch.optim.SGD(p, lr=1e-1), layer=1, steering_coeff=2.0,
                       alpha=3.0, update_layers=[1], update_module="mlp.down_proj", seed=9)
    bundle = random_bundle(module.model.get_input_embeddings().num_embeddings, module.stream_steps())
    trainer = _trainer(1)
    trainer.fit(module, DataLoader([bundle], batch_size=None))
    path = tmp_path / "rmu.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    start, _ = tiny_llama()
    assert not torch.equal(ckpt["state_dict"]["model.model.layers.1.mlp.down_proj.weight"],
                           start.model.layers[1].mlp.down_proj.weight)  # it trained

    loaded = RMUModule.load_from_checkpoint(path)
    assert type(loaded) is RMUModule
    mine = loaded.state_dict()
    assert mine.keys() == ckpt["state_dict"].keys()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(mine[k], v), k
    assert (loaded.layer, loaded.steering_coeff, loaded.alpha, loaded.update_layers, loaded.update_module,
            loaded.seed) == (1, 2.0, 3.0, [1], "mlp.down_proj", 9)
    assert torch.equal(loaded.direction, module.direction)
    assert [n for n, p in loaded.model.named_parameters() if p.requires_grad] == ["model.layers.1.mlp.down_proj.weight"]
    loaded.configure_model()  # the frozen copy is rebuilt from the source: the starting weights
    for n, p in start.named_parameters():
        assert torch.equal(dict(loaded.frozen_model.named_parameters())[n], p), n


def test_tiny_recipe_runs_two_steps_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tar-lightning"])
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # the CLI sets them; restored after the test
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    out = tmp_path / "run"
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        code = main(["fit", "--config", str(REPO / "recipes" / "tiny" / "rmu.yaml"), "--trainer.max_steps", "2",
                     "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)])
    random.setstate(py_state)
    np.random.set_state(np_state)
    assert code == 0
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    (metrics,) = list(out.rglob("metrics.csv"))
    with open(metrics, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/rmu_forget")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(float(r["train/rmu_forget"]) > 0 and float(r["train/rmu_retain"]) >= 0 for r in rows)
    assert type(RMUModule.load_from_checkpoint(last)) is RMUModule


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 2}, r"RMUModule.layer=2: expected a decoder layer index in 0..1 \(the model has 2 decoder layers\)"),
    ({"layer": -1}, r"RMUModule.layer=-1: .*the model has 2 decoder layers"),
    ({"layer": True}, r"RMUModule.layer=True"),
    ({"steering_coeff": 0.0}, r"RMUModule.steering_coeff=0.0: expected a finite number > 0"),
    ({"alpha": -1.0}, r"RMUModule.alpha=-1.0: expected a finite number >= 0"),
    ({"alpha": float("nan")}, r"RMUModule.alpha=nan"),
    ({"layer": 0, "update_layers": [0, 1]}, r"update_layers=\[0, 1\]: \[1\] outside 0..0"),
    ({"layer": 1, "update_layers": []}, r"update_layers=\[\]: expected a non-empty list"),
    ({"layer": 1, "update_layers": [1, 1]}, r"update_layers=\[1, 1\]: expected a non-empty list of distinct"),
    ({"layer": 1, "update_module": "mlpp"}, r"update_module='mlpp': decoder layer 0 .* has no such submodule"),
    ({"layer": 1, "seed": "1"}, r"RMUModule.seed='1': expected an integer"),
])
def test_bad_options_raise_config_errors_naming_them(kwargs, message):
    model, tok = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        RMUModule(model, tokenizer=tok, **kwargs)


def test_alpha_zero_needs_no_frozen_copy_and_without_configure_model_the_error_says_what_to_do():
    model, tok = tiny_llama()
    bundle = random_bundle(len(tok), {"forget": 1, "retain": 1})
    forget, retain = _micro(bundle, "forget"), _micro(bundle, "retain")
    no_retain = RMUModule(model, tokenizer=tok, layer=1, alpha=0.0)
    no_retain.configure_model()
    assert no_retain.frozen_model is None and set(no_retain.rmu_losses(forget, retain)[1]) == {"forget"}
    with pytest.raises(ConfigError, match="configure_model"):
        RMUModule(tiny_llama()[0], tokenizer=tok, layer=1).rmu_losses(forget, retain)


@pytest.mark.slow  # one 2-process CLI run (~40 s)
def test_tiny_recipe_runs_under_the_fsdp2_launch_overlay(tmp_path):
    """recipes/tiny/rmu.yaml under recipes/launch/fsdp2_8gpu.yaml with only the hardware keys changed for 2 gloo CPU
    processes: the model and its frozen copy are sharded by configure_model, and the sharded checkpoint reloads."""
    proc = fit_under_fsdp2_overlay(REPO / "recipes/tiny/rmu.yaml", tmp_path, "--trainer.max_steps", "2")
    assert "max_steps=2` reached" in proc.stdout + proc.stderr
    root = tmp_path / "run"
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a sharded checkpoint folder
    loaded = RMUModule.load_from_checkpoint(last)
    start, _ = tiny_llama()
    trained = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, start.get_parameter(n))}
    assert trained == {f"model.layers.{i}.mlp.{w}.weight" for i in (0, 1) for w in ("gate_proj", "up_proj", "down_proj")}
