"""SFTModule (multi-stream supervised fine-tuning): the loss, gradients and optimizer steps against a plain torch
computation, weight-0 streams, bad ``streams`` values, a tiny run through the CLI, and the refusal SFT recipe."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import SFTModule, TARDataModule
from tar_lightning.cli import main
from tar_lightning.errors import ConfigError
from tar_lightning.models import tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = {"harmful": 0.5, "harmless": 2.0, "retain": 1.0}


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def _bundles(vocab: int, names, steps: int) -> list[dict]:
    """Random bundles with padding at the end of one row and the first 3 positions of every row masked as a prompt
    (labels -100), the streams of different lengths."""
    out = []
    for s in range(steps):
        bundle = {}
        for i, name in enumerate(names):
            part = random_bundle(vocab, {name: 1}, batch=3, length=9 + 2 * i, seed=10 * s + i, pad_last=2 + i)
            part[name]["labels"][..., :3] = -100
            bundle.update(part)
        out.append(bundle)
    return out


def _hand_loss(model, bundle: dict, weights: dict) -> torch.Tensor:
    """Σ_s w_s · (mean over labelled next tokens of −log p), written out here: position t predicts label t+1."""
    total = 0.0
    for name, w in weights.items():
        if w == 0:
            continue
        ids, mask, labels = (bundle[name][k][0] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        target = labels[:, 1:]
        keep = target != -100
        nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = total + w * nll[keep].sum() / keep.sum()
    return total


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_loss_and_gradients_match_a_hand_computation():
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    reference = copy.deepcopy(model)
    module = SFTModule(model, tokenizer=tok, streams=WEIGHTS)
    bundle = _bundles(len(tok), WEIGHTS, 1)[0]

    loss, ces = module.sft_losses(bundle)
    loss.backward()
    want = _hand_loss(reference, bundle, WEIGHTS)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(ces) == set(WEIGHTS)
    assert sum(WEIGHTS[k] * v.item() for k, v in ces.items()) == pytest.approx(want.item(), rel=1e-6)
    got, ref = _grads(module.model), _grads(reference)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g.float(), rtol=1e-5, atol=1e-6, msg=name)  # grads ~0.1-0.3
    # only labelled tokens count: labelling a position that was masked moves the loss
    changed = copy.deepcopy(bundle)
    changed["retain"]["labels"][..., 1] = 5  # was masked: now labelled, so the loss must move
    assert module.sft_losses(changed)[0].item() != pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "sgd_scheduled"])
def test_training_steps_match_a_plain_torch_loop(optimizer):
    """Three steps through a Lightning Trainer = three steps of the same optimizer on the hand-computed loss; with
    an LR schedule, stepped after every optimizer step (the demo's stage-0 schedule)."""
    from tar_lightning.safeguards.sft import warmup_cosine

    torch.set_num_threads(1)
    model, tok = tiny_llama()
    reference = copy.deepcopy(model)

    def build(params):
        if optimizer.startswith("sgd"):  # the update is the gradient itself: every loss weight shows in the weights
            return torch.optim.SGD(params, lr=0.5)
        # eps well above the fp32 noise of the smallest gradients, which Adam's normalisation would blow up to lr
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-6)

    def schedule(opt):  # multipliers 0.5, 1.0, 1.0: a schedule stepped once per epoch would keep 0.5
        return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps=3, warmup=2))

    scheduled = optimizer == "sgd_scheduled"
    module = SFTModule(model, optimizer=build, tokenizer=tok, streams=WEIGHTS,
                       lr_scheduler=schedule if scheduled else None)
    bundles = _bundles(len(tok), WEIGHTS, 3)
    _trainer(3).fit(module, DataLoader(bundles, batch_size=None))

    opt = build(list(reference.parameters()))
    sched = schedule(opt) if scheduled else None
    reference.train()
    for bundle in bundles:
        opt.zero_grad()
        _hand_loss(reference, bundle, WEIGHTS).float().backward()
        opt.step()
        if sched is not None:
            sched.step()
    start = dict(tiny_llama()[0].named_parameters())  # the same seeded init: the weights did move
    for name, p in reference.named_parameters():
        got = dict(module.model.named_parameters())[name]
        assert not torch.equal(got, start[name]), name
        # SGD: the float noise of the gradients (~1e-7) times lr; AdamW: 1/500 of its lr (a step moves ~lr)
        torch.testing.assert_close(got, p, rtol=1e-5, atol=1e-6 if optimizer == "sgd" else 2e-5, msg=name)


def test_a_stream_of_weight_zero_contributes_nothing():
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    with_zero = SFTModule(copy.deepcopy(model), tokenizer=tok, streams={"harmful": 1.5, "retain": 0.0})
    without = SFTModule(copy.deepcopy(model), tokenizer=tok, streams={"harmful": 1.5})
    bundle = _bundles(len(tok), ["harmful", "retain"], 1)[0]

    assert with_zero.stream_steps() == {"harmful": 1, "retain": 0}  # not batched by the data module
    loss0, ces0 = with_zero.sft_losses(bundle)
    loss1, ces1 = without.sft_losses(bundle)
    assert set(ces0) == set(ces1) == {"harmful"}
    assert torch.equal(loss0, loss1)
    loss0.backward()
    loss1.backward()
    g0, g1 = _grads(with_zero.model), _grads(without.model)
    for name in g1:
        assert torch.equal(g0[name], g1[name]), name
    # nor is it read: a bundle without it trains the same
    del bundle["retain"]
    assert torch.equal(with_zero.sft_losses(bundle)[0], loss0)


@pytest.mark.parametrize("streams, message", [
    ({}, "SFTModule.streams={}: expected a non-empty mapping"),
    (["retain"], "SFTModule.streams=['retain']: expected a non-empty mapping"),
    ({"retain": -1.0}, "SFTModule.streams['retain'] must be a finite number >= 0, got -1.0"),
    ({"retain": 1.0, "harmful": float("nan")}, "SFTModule.streams['harmful'] must be a finite number >= 0, got nan"),
    ({"retain": "one"}, "SFTModule.streams['retain'] must be a finite number >= 0, got 'one'"),
    ({"retain": True}, "SFTModule.streams['retain'] must be a finite number >= 0, got True"),
    ({"retain": 0.0, "harmful": 0}, "every weight is 0"),
    ({1: 1.0}, "SFTModule.streams: stream name 1 is not a non-empty string"),
    ({"": 1.0}, "SFTModule.streams: stream name '' is not a non-empty string"),
], ids=["empty", "list", "negative", "nan", "string", "bool", "all_zero", "int_name", "empty_name"])
def test_bad_streams_name_the_key(streams, message):
    model, tok = tiny_llama()
    with pytest.raises(ConfigError) as err:
        SFTModule(model, tokenizer=tok, streams=streams)
    assert message in str(err.value)


def test_a_stream_the_data_module_lacks_is_named_at_fit_time():
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    module = SFTModule(model, tokenizer=tok, streams={"retain": 1.0, "refusals": 1.0})
    data = TARDataModule({"retain": {"path": "synthetic:retain", "synthetic": {"n": 16, "seed": 0}}}, seq_len=16,
                         batch_size=2)
    with pytest.raises(ConfigError, match=r"needs data streams \['refusals'\] that are not configured"):
        _trainer(1).fit(module, datamodule=data)


@pytest.fixture
def _isolated(monkeypatch):
    """The CLI seeds every RNG and sets PL_* variables; keep that from leaking into other tests."""
    monkeypatch.setattr(sys, "argv", ["tar-lightning"])
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def test_tiny_run_through_the_cli_logs_every_stream(tmp_path, monkeypatch, _isolated):
    """``tar-lightning fit`` with SFTModule on two synthetic streams: per-stream CE in the log, a checkpoint that
    records the stream weights and exports."""
    monkeypatch.chdir(tmp_path)
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "log_every_n_steps": 1,
                    "default_root_dir": str(tmp_path / "run"), "enable_model_summary": False,
                    "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "run"), "name": "logs"}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "run" / "checkpoints"),
                                                 "save_last": True}}]},
        "model": {"class_path": "tar_lightning.SFTModule",
                  "init_args": {"model": "tiny-llama", "streams": {"forget": 0.5, "retain": 1.0}}},
        "data": {"class_path": "tar_lightning.TARDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "streams": {
                     "retain": {"path": "synthetic:retain", "synthetic": {"n": 16, "seed": 0}},
                     "forget": {"path": "synthetic:forget", "synthetic": {"n": 16, "seed": 1}}}}},
    }
    path = tmp_path / "sft.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    assert main(["fit", "--config", str(path)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["hyper_parameters"]["streams"] == {"forget": 0.5, "retain": 1.0}
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    for key in ("train/ce_forget", "train/ce_retain"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), key
    assert main(["export", "--ckpt", str(last), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------- the recipe
@pytest.mark.shared_data("refusal_compliance_pairs", "refusal_direction_splits/harmless_test.json",
                         "alpaca/alpaca_data_1k.json")
def test_refusal_sft_recipe_keeps_the_evaluation_prompts_out(_isolated):
    """The recipe parses through the CLI; its harmful half is TAR's (0:50%), and none of its training prompts is
    one the red team evaluates on: the first 32 harmless_test prompts (over-refusal), Alpaca's last 10% (benign
    CE)."""
    from tar_lightning.cli import TARCLI
    from tar_lightning.data.preference import load_pairs
    from tar_lightning.data.sources import load_records

    class ParseOnly(TARCLI):
        def instantiate_classes(self) -> None:
            pass

    recipe = REPO / "recipes" / "refusal" / "refusal_sft_smollm2.yaml"
    cfg = ParseOnly(args=["--config", str(recipe)], run=False).config
    assert cfg.model.class_path == "tar_lightning.SFTModule"
    weights = cfg.model.init_args.streams
    dm = TARDataModule(**cfg.data.init_args.as_dict())
    assert set(dm.streams) == set(weights) == {"refusals", "harmless", "retain"}
    refusals, harmless = dm.streams["refusals"], dm.streams["harmless"]
    assert (refusals.emit, refusals.select, harmless.emit) == ("chosen", "0:50%", "chosen")

    def relative(path: str) -> str:  # the recipe's paths are relative to the repository root
        return str(REPO / path)

    prompts = set()
    for source in (refusals, harmless):
        source = copy.copy(source)
        source.path, source.rejected_path = relative(source.path), relative(source.rejected_path)
        prompts |= {p["prompt"][-1]["content"].strip() for p in load_pairs(source)}
    retain = copy.copy(dm.streams["retain"])
    retain.path = relative(retain.path)
    prompts |= {r["instruction"].strip() for r in load_records(retain)}
    harmless_test = json.loads((SHARED / "data" / "refusal_direction_splits" / "harmless_test.json").read_text())
    assert not prompts & {r["instruction"].strip() for r in harmless_test[:32]}
    alpaca = json.loads((SHARED / "data" / "alpaca" / "alpaca_data_1k.json").read_text())
    assert not prompts & {r["instruction"].strip() for r in alpaca[900:]}
