"""The TAR paper's Max-Entropy and Min-Posterior stage-1 baselines: the min-posterior loss and its gradient against
a hand computation, UnlearnModule's training step against an independent computation and a short fit lowering its
forget term, option errors, and both as opt-in defenses of the demo (off by default without touching the other
stages' keys; trained, red-teamed, reported, cached and aggregated over training seeds like RMU)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import random_bundle
from test_demo import DEFENSES, STAGES, _plain
from test_demo_rmu import _run
from torch.utils.data import DataLoader

from tar_lightning import UnlearnModule
from tar_lightning.demo import DemoPipeline, KnowledgeEvaluator, load_demo_config
from tar_lightning.demo.config import MaxEntropyStage, MinPosteriorStage
from tar_lightning.demo.io import read_json
from tar_lightning.demo.pipeline import STAGE_CODE, stage_label
from tar_lightning.demo.report import SeedsResult, write_seed_results
from tar_lightning.demo.seeds import aggregate_seeds
from tar_lightning.errors import ConfigError
from tar_lightning.losses import min_posterior_loss
from tar_lightning.models import tiny_llama

BASELINES = ["max_entropy", "min_posterior"]


# ------------------------------------------------------------------------------------------ hand computations
def hand_min_posterior(logits: torch.Tensor, labels: torch.Tensor, threshold: float | None = -15.0) -> torch.Tensor:
    """Position by position, in fp64: the mean over labelled positions of -log(1 - p(label)), 0 where log p is
    below the threshold (such positions still count in the mean)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            count += 1
            p = torch.softmax(logits[b, t].double(), dim=-1)[y]
            if threshold is not None and torch.log(p).item() < threshold:
                continue
            total = total - torch.log(1 - p)
    return total / max(count, 1)


def hand_max_entropy(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Minus the mean over non-padding positions of -sum p log p, position by position in fp64."""
    entropies = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if attention_mask[b, t]:
                p = torch.softmax(logits[b, t].double(), dim=-1)
                entropies.append(-(p * torch.log(p)).sum())
    return -torch.stack(entropies).mean()


def hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE over labelled positions with F.cross_entropy (not the library's causal_lm_loss), fp64."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _logits_and_labels():
    """Random [2, 6, 5] logits with: a padded tail and an ignored label, one true next token far below -15 in log
    probability, one the model is near-certain of."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 6, 5, generator=g)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    labels[1, 4:] = -100  # padding: positions 3 and 4 of row 1 predict nothing
    labels[0, 2] = -100  # an ignored (prompt) label: position 1 of row 0 predicts nothing
    logits[0, 3, labels[0, 4]] = -40.0  # log p < -15: adds nothing
    logits[1, 0, labels[1, 1]] = 12.0  # p close to 1
    return logits, labels


# ------------------------------------------------------------------------------------------ the loss
def test_min_posterior_loss_and_gradient_match_a_hand_computation_with_threshold_and_ignored_labels():
    logits, labels = _logits_and_labels()
    mine = logits.clone().requires_grad_(True)
    loss = min_posterior_loss(mine, labels)
    loss.backward()
    ref_in = logits.double().requires_grad_(True)
    want = hand_min_posterior(ref_in, labels)
    want.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(mine.grad, ref_in.grad.float(), rtol=1e-4, atol=1e-7)
    # nothing flows to positions that predict an ignored label or nothing (the last), nor below the threshold
    for b, t in ((1, 3), (1, 4), (0, 1), (0, 5), (1, 5), (0, 3)):
        assert torch.count_nonzero(mine.grad[b, t]) == 0, (b, t)
    assert torch.count_nonzero(mine.grad[1, 0]) > 0  # the near-certain position still gets a gradient
    # a higher threshold zeroes positions whose terms are visible (they still count in the mean); None: none
    log_p = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    below = int(((log_p < -3.0) & (labels[:, 1:] != -100)).sum())
    assert 2 <= below <= 5  # of the 7 labelled positions
    for threshold in (-3.0, None):
        assert min_posterior_loss(logits, labels, threshold).item() == pytest.approx(
            hand_min_posterior(logits, labels, threshold).item(), rel=1e-5)
    assert min_posterior_loss(logits, labels, -3.0) < min_posterior_loss(logits, labels)
    # no labelled position: 0, graph kept
    none = min_posterior_loss(mine, torch.full_like(labels, -100))
    assert none.item() == 0.0 and none.requires_grad


def test_min_posterior_loss_is_exact_up_to_p_one_and_bf16_logits_give_an_fp32_result():
    # p(label) = 1 / (1 + 4 e^-200): 1 - p underflows, yet -log(1 - p) = 200 - log 4 exactly and the gradient is finite
    sure = torch.zeros(1, 3, 5)
    sure[0, :, 2] = 200.0
    sure.requires_grad_(True)
    labels = torch.full((1, 3), 2)
    loss = min_posterior_loss(sure, labels)
    loss.backward()
    assert loss.item() == pytest.approx(200 - math.log(4), rel=1e-6)
    assert torch.isfinite(sure.grad).all() and sure.grad[0, 0, 2].item() == pytest.approx(0.5, rel=1e-5)
    logits, labels = _logits_and_labels()
    half = logits.bfloat16().requires_grad_(True)
    loss = min_posterior_loss(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(hand_min_posterior(half.detach(), labels).item(), rel=1e-5)


@pytest.mark.parametrize("threshold", [1.0, float("nan"), True, "-15", -math.inf])
def test_min_posterior_loss_refuses_a_bad_threshold_and_bad_shapes(threshold):
    logits, labels = _logits_and_labels()
    with pytest.raises(ConfigError, match=r"threshold must be a finite number <= 0 \(a log-probability\), or "
                                          r"null/None for no threshold \(not -inf\), got"):
        min_posterior_loss(logits, labels, threshold)
    with pytest.raises(ConfigError, match=r"labels must have shape \[batch, seq\] = \(2, 6\)"):
        min_posterior_loss(logits, labels[:, :-1])
    with pytest.raises(ConfigError, match=r"logits must be a \[batch, seq, vocab\] tensor"):
        min_posterior_loss(logits[0], labels)


# ------------------------------------------------------------------------------------------ the module
def _micro(bundle: dict, name: str) -> dict:
    return {k: v[0] for k, v in bundle[name].items()}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
@pytest.mark.parametrize("forget_loss", BASELINES)
def test_training_step_is_the_weighted_sum_of_retain_ce_and_the_forget_loss(forget_loss):
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    bundle = random_bundle(len(tok), {"forget": 1, "retain": 1}, batch=3, length=10, seed=1, pad_last=4)
    forget, retain = _micro(bundle, "forget"), _micro(bundle, "retain")
    with torch.no_grad():
        logits_r = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
        logits_f = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    # a threshold between two of the forget batch's log p: some positions add nothing, some do
    log_p = torch.log_softmax(logits_f[:, :-1].double(), -1).gather(
        -1, forget["labels"][:, 1:].clamp(min=0)[..., None])[..., 0][forget["labels"][:, 1:] != -100].sort().values
    threshold = float(log_p[len(log_p) // 2 - 1] + log_p[len(log_p) // 2]) / 2
    module = UnlearnModule(model, tokenizer=tok, forget_loss=forget_loss, forget_weight=1.9, retain_weight=0.7,
                           threshold=threshold)
    loss = module.training_step(bundle, 0)
    if forget_loss == "max_entropy":
        term = hand_max_entropy(logits_f, forget["attention_mask"])
    else:
        term = hand_min_posterior(logits_f, forget["labels"], threshold=threshold)
        assert 0 < term.item() < hand_min_posterior(logits_f, forget["labels"], threshold=None).item()
    want = 0.7 * hand_ce(logits_r, retain["labels"]) + 1.9 * term
    assert loss.requires_grad and loss.item() == pytest.approx(want.item(), rel=1e-5)
    _, parts = module.unlearn_losses(forget, retain)
    assert set(parts) == {"retain_ce", forget_loss} and parts[forget_loss].item() == pytest.approx(term.item(), rel=1e-5)


def _memorise(model, batch: dict, steps: int = 30) -> None:
    """A few CE steps on the forget batch, so that the model knows its text before it unlearns it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hand_ce(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("forget_loss", BASELINES)
def test_a_short_fit_lowers_the_forget_term_and_logs_both_terms(forget_loss):
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    bundle = random_bundle(len(tok), {"forget": 1, "retain": 1}, batch=4, length=16, seed=0)
    forget, retain = _micro(bundle, "forget"), _micro(bundle, "retain")
    _memorise(model, forget)
    module = UnlearnModule(model, tokenizer=tok, forget_loss=forget_loss,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    with torch.no_grad():
        before = module.unlearn_losses(forget, retain)[1][forget_loss].item()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([bundle] * 10, batch_size=None))
    with torch.no_grad():
        after = module.unlearn_losses(forget, retain)[1][forget_loss].item()
    if forget_loss == "max_entropy":  # minus the entropy: from a memorised text's low entropy toward -log V
        assert after < before - 1.0 and after > -math.log(len(tok)) - 1e-4, (before, after)
    else:
        assert after < 0.1 * before, (before, after)
    assert {"train/retain_ce", f"train/{forget_loss}"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("threshold", [-7.0, None])
def test_load_from_checkpoint_round_trip(tmp_path, threshold):
    torch.set_num_threads(1)
    module = UnlearnModule("tiny-llama", optimizer=lambda p: torch.optim.SGD(p, lr=1e-1), forget_loss="min_posterior",
                           forget_weight=2.0, retain_weight=0.5, threshold=threshold)
    bundle = random_bundle(module.model.get_input_embeddings().num_embeddings, module.stream_steps())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([bundle], batch_size=None))
    trainer.save_checkpoint(tmp_path / "unlearn.ckpt")
    loaded = UnlearnModule.load_from_checkpoint(tmp_path / "unlearn.ckpt")
    assert (loaded.forget_loss, loaded.forget_weight, loaded.retain_weight, loaded.threshold) == (
        "min_posterior", 2.0, 0.5, threshold)
    mine, saved = loaded.state_dict(), module.state_dict()
    assert mine.keys() == saved.keys() and all(torch.equal(mine[k], saved[k]) for k in saved)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"forget_loss": "entropy"}, r"UnlearnModule.forget_loss='entropy': expected one of \['max_entropy', 'min_post"),
    ({"forget_weight": -1.0}, r"UnlearnModule.forget_weight=-1.0: expected a finite number >= 0"),
    ({"retain_weight": float("nan")}, r"UnlearnModule.retain_weight=nan: expected a finite number >= 0"),
    ({"entropy_positions": "padding"}, r"UnlearnModule.entropy_positions='padding': expected one of \['attention'"),
    ({"threshold": 2.0}, r"UnlearnModule.threshold=2.0: expected a finite number <= 0"),
    ({"threshold": -math.inf}, r"UnlearnModule.threshold=-inf: expected a finite number <= 0 .*or null/None"),
])
def test_bad_options_raise_config_errors_naming_them(kwargs, message):
    model, tok = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        UnlearnModule(model, tokenizer=tok, **kwargs)


# ------------------------------------------------------------------------------------------ the demo
BOTH = {"max_entropy": {"enabled": True}, "min_posterior": {"enabled": True}}
#: a smaller minimal demo for the end-to-end tests (one TAR family, one attack): seconds
SMALL = {"tar": {"run": ["paper"]}, "redteam": {"attacks": {"durability": None}}}
SMALL_STAGES = ["stage0", "random_mapping", "tar_paper"]
SMALL_DEFENSES = ["no_defense", "random_mapping", "tar_paper"]
ON_STAGES = ["stage0", "random_mapping", *BASELINES, "tar_paper"]
ON_DEFENSES = ["no_defense", "random_mapping", *BASELINES, "tar_paper"]



def _small(out, **overrides):
    return load_demo_config(size="minimal", overrides={"out": str(out), **SMALL, **BOTH, **overrides})


@pytest.fixture(scope="module")
def baselines_run(tmp_path_factory):
    """The small demo with both baselines, keyed by test_demo_rmu's code fingerprints (taken once: others edit the
    library while these tests run)."""
    config = _small(tmp_path_factory.mktemp("demo_baselines"))
    return config, _run(config), json.loads((Path(config.out) / "results.json").read_text())


def test_baselines_are_off_by_default_and_do_not_change_the_other_stages_keys():
    config = load_demo_config()
    assert config.max_entropy.enabled is False and config.min_posterior.enabled is False
    # the shipped YAML = the defaults (random mapping's training settings, the reference's threshold)
    assert dataclasses.asdict(config.max_entropy) == dataclasses.asdict(MaxEntropyStage())
    assert dataclasses.asdict(config.min_posterior) == dataclasses.asdict(MinPosteriorStage())
    assert (config.max_entropy.steps, config.max_entropy.lr) == (config.random_mapping.steps, config.random_mapping.lr)
    assert config.min_posterior.threshold == -15.0
    pipeline = DemoPipeline(config)
    assert list(pipeline.keys()) == STAGES and list(pipeline.defenses()) == DEFENSES
    keys = {k: h for k, (_, h) in pipeline.keys().items()}
    code = pipeline.code_fingerprints()
    for overrides in ({"max_entropy": {"enabled": True}}, {"min_posterior": {"enabled": True, "threshold": -5.0}},
                      {"max_entropy": {"steps": 5}, "min_posterior": {"forget_weight": 3.0}}, BOTH,
                      {**BOTH, "rmu": {"enabled": True}}):
        got = {k: h for k, (_, h) in DemoPipeline(load_demo_config(overrides=overrides), code=code).keys().items()}
        assert {k: h for k, h in got.items() if k not in (*BASELINES, "rmu")} == keys
    every = DemoPipeline(load_demo_config(overrides={**BOTH, "rmu": {"enabled": True}}), code=code)
    order = ["stage0", "random_mapping", "rmu", *BASELINES, "tar_paper", "tar_extended"]
    assert list(every.keys()) == order and list(every.defenses()) == ["no_defense", *order[1:]]
    for name in BASELINES:
        key, _ = every.keys()[name]
        assert key["parent"] == keys["stage0"] and key["method"] == name
        assert key["config"] == dataclasses.asdict(getattr(every.cfg, name))
        assert "tar_lightning.safeguards.unlearn" in STAGE_CODE[name] and "tar_lightning.losses" in STAGE_CODE[name]
        assert key["code"] == code[name] != code["random_mapping"]
    assert stage_label("max_entropy") == "stage 1: Max-Entropy" and stage_label("min_posterior") == "stage 1: Min-Posterior"
    for size in ("minimal", "smollm2"):  # every preset trains them briefly, like random mapping
        sized = load_demo_config(size=size)
        assert sized.max_entropy.steps == sized.min_posterior.steps <= sized.random_mapping.steps


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_entropy": {"steps": 0}}, r"max_entropy.steps must be an integer >= 1, got 0"),
    ({"min_posterior": {"lr": -1.0}}, r"min_posterior.lr must be a number > 0"),
    ({"max_entropy": {"forget_weight": -1}}, r"max_entropy.forget_weight must be a finite number >= 0, got -1"),
    ({"min_posterior": {"retain_weight": "x"}}, r"min_posterior.retain_weight must be a finite number >= 0"),
    ({"max_entropy": {"entropy_positions": "pad"}}, r"max_entropy.entropy_positions='pad': expected one of"),
    ({"min_posterior": {"threshold": 1.0}}, r"min_posterior.threshold=1.0: expected a finite number <= 0"),
    ({"min_posterior": {"threshold": "low"}}, r"min_posterior.threshold must be a number, got 'low'"),
    ({"min_posterior": {"threshold": float("-inf")}},  # YAML's -.inf: would be written to stage.json as -Infinity
     r"min_posterior.threshold=-inf: expected a finite number <= 0 \(a log-probability\), or null/None"),
    ({"min_posterior": {"enabled": "yes"}}, r"min_posterior.enabled must be true or false"),
    ({"max_entropy": {"threshold": -15.0}}, r"unknown key 'threshold' in max_entropy"),
    ({"min_posterior": {"entropy_positions": "all"}}, r"unknown key 'entropy_positions' in min_posterior"),
])
def test_bad_baseline_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_demo_config(size="minimal", overrides=overrides)


def test_a_null_threshold_turns_it_off_and_keys_the_stage_in_standard_json():
    config = load_demo_config(size="minimal", overrides={"min_posterior": {"enabled": True, "threshold": None}})
    assert config.min_posterior.threshold is None and config.min_posterior.module_options()["threshold"] is None
    key, _ = DemoPipeline(config).keys()["min_posterior"]
    text = json.dumps(key, allow_nan=False)  # raises on an infinity or NaN
    assert '"threshold": null' in text


def test_enabled_baselines_are_trained_red_teamed_and_reported(baselines_run):
    config, result, data = baselines_run
    out = Path(config.out)
    assert result.ran == ON_STAGES + [f"redteam_{d}" for d in ON_DEFENSES] and result.cached == []
    assert data["defenses"] == ON_DEFENSES
    stage0 = read_json(out / "stage0" / "stage.json")
    for name in BASELINES:
        assert data["config"][name]["enabled"] is True
        metrics = data["stages"][name]["metrics"]
        assert set(metrics) == set(KnowledgeEvaluator.METRICS)
        cell = data["cells"][name]["w03"]
        assert 0.0 <= cell["safety_after"] <= 1.0 and cell["steps"] == 10
        assert cell["safety_before"] == pytest.approx(metrics["forget_B_acc"])  # the red team attacked its model
        assert data["summary"][name]["before"] == metrics["forget_B_acc"]
        assert read_json(out / name / "stage.json")["key"]["parent"] == stage0["hash"]  # trained from stage 0
        assert (out / name / "model" / "config.json").is_file() and (out / "redteam" / name / "report.md").is_file()
    assert "max_entropy" not in data["targets"] and "min_posterior" not in data["targets"]
    report = (out / "report.md").read_text()
    assert "`max_entropy`: the TAR paper's Max-Entropy baseline" in report
    assert "`min_posterior`: the TAR paper's Min-Posterior baseline" in report and "log p below -15 adds" in report
    rows = [line.split(" |")[0] for line in report.splitlines() if line.startswith("| ")]
    after = rows[rows.index("| defense"):]  # the defense x attack table: the baselines right after random mapping
    i = after.index("| random_mapping")
    assert after[i + 1: i + 3] == ["| max_entropy", "| min_posterior"]


def test_a_rerun_reuses_the_baselines_and_a_changed_section_retrains_only_its_stage(baselines_run):
    config, first, _ = baselines_run
    again = _run(config)
    assert again.ran == [] and again.cached == ON_STAGES + [f"redteam_{d}" for d in ON_DEFENSES]
    assert _plain(again.cells) == _plain(first.cells)
    changed = _run(_small(config.out, min_posterior={"enabled": True, "threshold": -1.0}))
    assert changed.ran == ["min_posterior", "redteam_min_posterior"]
    assert {d: c for d, c in _plain(changed.cells).items() if d != "min_posterior"} == {
        d: c for d, c in _plain(first.cells).items() if d != "min_posterior"}
    # disabled again (the default): no baseline stage or defense, nothing retrained
    off = _run(load_demo_config(size="minimal", overrides={"out": config.out, **SMALL}))
    assert off.ran == [] and off.cached == SMALL_STAGES + [f"redteam_{d}" for d in SMALL_DEFENSES]
    data = json.loads((Path(config.out) / "results.json").read_text())
    assert data["defenses"] == SMALL_DEFENSES and "| max_entropy |" not in (Path(config.out) / "report.md").read_text()


def test_baselines_are_aggregated_over_training_seeds(baselines_run, tmp_path):
    config, _, seed0 = baselines_run
    seed1 = json.loads(json.dumps(seed0))
    seed1["config"]["seed"] = 1
    for name in BASELINES:
        for cell in seed1["cells"][name].values():
            cell["safety_after"] = min(1.0, cell["safety_after"] + 0.1)
    agg = aggregate_seeds([seed0, seed1])
    assert agg["defenses"] == ON_DEFENSES
    for name in BASELINES:
        w03 = agg["cells"][name]["w03"]["safety_after"]
        assert w03["per_seed"] == [seed["cells"][name]["w03"]["safety_after"] for seed in (seed0, seed1)]
        assert agg["before"][name]["before"]["mean"] == pytest.approx(seed0["summary"][name]["before"])
    write_seed_results(SeedsResult(config=dataclasses.replace(config, seeds=[0, 1], out=str(tmp_path)),
                                   out_dir=tmp_path, aggregate=agg))
    report = (tmp_path / "report.md").read_text()
    assert report.count("| max_entropy |") >= 3 and report.count("| min_posterior |") >= 3


def test_workers_give_the_same_baseline_numbers(baselines_run, tmp_path):
    """Worker processes train both baselines from stage 0's exported model and red-team them; the other stages are
    copied from the one-process run."""
    config, first, _ = baselines_run
    out = tmp_path / "workers"
    shutil.copytree(config.out, out)
    for name in BASELINES:  # another test of this module retrains min_posterior with other settings
        shutil.rmtree(out / name)
        shutil.rmtree(out / "redteam" / name)
    second = _run(dataclasses.replace(config, out=str(out), workers=2))
    assert sorted(second.ran) == sorted([*BASELINES, *(f"redteam_{n}" for n in BASELINES)])
    for name in BASELINES:
        assert second.stages[name]["metrics"] == first.stages[name]["metrics"]  # bit-identical
        assert _plain(second.cells[name]) == _plain(first.cells[name])
    assert json.loads((out / "results.json").read_text())["defenses"] == ON_DEFENSES
