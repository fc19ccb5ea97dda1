"""The demo (tar_lightning.demo): the minimal preset end to end, every defense × attack cell, stage caching, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import tar_lightning
from tar_lightning.demo import (
    DEFAULT_CONFIG,
    DemoConfig,
    KnowledgeEvaluator,
    demo_targets,
    load_demo_config,
    run_demo,
)
from tar_lightning.demo.cli import demo_main
from tar_lightning.demo.pipeline import STAGE_CODE
from tar_lightning.errors import ConfigError
from tar_lightning.safeguards import random_mapping as random_mapping_module

DEFENSES = ["no_defense", "random_mapping", "tar_paper", "tar_extended"]
STAGES = ["stage0", "random_mapping", "tar_paper", "tar_extended"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = load_demo_config(size="minimal", overrides={"out": str(out)})
    threads = torch.get_num_threads()
    result = run_demo(config)
    return config, result, threads


def test_default_yaml_loads_and_every_field_is_commented():
    config = load_demo_config()
    assert config.size == "default" and config.model == "tiny" and config.threads == 1 and config.workers == 2
    assert config.tar.entropy_positions == "labels" and config.tar.run == ["paper", "extended"]
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert "minimal" in raw["sizes"]
    for line in DEFAULT_CONFIG.read_text().splitlines():
        # every line that sets a scalar field (key: value) carries a comment
        if re.match(r"^\s*-?\s*[a-z_]+:\s*[^\s#{]", line) and not line.strip().startswith("#"):
            assert "#" in line, f"uncommented field in {DEFAULT_CONFIG.name}: {line!r}"


def test_model_option_selects_its_preset_and_an_explicit_size_wins():
    config = load_demo_config(overrides={"model": "smollm2-135m-instruct"})
    assert config.size == "smollm2" and config.model == "smollm2-135m-instruct"
    assert config.threads == 2 and config.stage0.lr < load_demo_config().stage0.lr  # a pretrained model's LRs
    assert set(config.tar.run) == {"paper", "extended"}
    for family in config.tar.run:  # the preset restates every family with its own LRs
        config.tar.tar_config(family)
    assert load_demo_config(size="minimal", overrides={"model": "smollm2-135m-instruct"}).size == "minimal"
    assert load_demo_config(overrides={"model": "some/other-model"}).size == "default"


def test_a_suite_set_to_null_is_dropped_from_the_red_team():
    # a mapping layer cannot remove a key by merging: null is how a user drops the shipped durability suite
    config = load_demo_config(overrides={"redteam": {"attacks": {"durability": None, "weaponization": ["w03"]}}})
    assert config.redteam.attacks == {"weaponization": ["w03"]}
    assert load_demo_config().redteam.attacks["durability"] == ["d01", "d05"]
    with pytest.raises(ConfigError, match="redteam.attacks must map suite names .* at least one must stay"):
        load_demo_config(overrides={"redteam": {"attacks": {"durability": None, "weaponization": None}}})


def test_config_errors_name_the_problem(tmp_path):
    bad_sizes = tmp_path / "bad_sizes.yaml"
    bad_sizes.write_text("model: tiny\nsizes: [minimal]\n")
    with pytest.raises(ConfigError, match="bad_sizes.yaml: 'sizes' must map preset names"):
        load_demo_config(bad_sizes)
    with pytest.raises(ConfigError, match="unknown size"):
        load_demo_config(size="huge")
    with pytest.raises(ConfigError, match="unknown key 'stepz' in stage0"):
        load_demo_config(overrides={"stage0": {"stepz": 3}})
    with pytest.raises(ConfigError, match="tar.run names family 'nope'"):
        load_demo_config(overrides={"tar": {"run": ["nope"]}})
    with pytest.raises(ConfigError, match="cannot read"):
        load_demo_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="redteam.during"):
        load_demo_config(overrides={"redteam": {"during": ["accuracy"]}})
    with pytest.raises(ConfigError, match="world"):
        DemoConfig.from_dict({"world": {"n_forgett": 3}})
    with pytest.raises(ConfigError, match=r"tar.options.extended: forget_split must be one of \['attacker', "
                                          r"'defender', 'defender_alternating'\].*got 'both'"):
        load_demo_config(overrides={"tar": {"options": {"extended": {"forget_split": "both"}}}})
    with pytest.raises(ConfigError, match=r"forget_split 'defender' sets the TR streams itself; leave out \['tr_stream'\]"):
        load_demo_config(overrides={"tar": {"options": {"extended": {"forget_split": "defender", "tr_stream": "tr"}}}})
    benign = {"benign": [{"name": "domain", "data": "retain_domain", "lr": 1e-3}]}
    with pytest.raises(ConfigError, match="no adversary of family 'benign' trains on 'forget'"):
        load_demo_config(overrides={"tar": {"families": benign, "options": {"benign": {"forget_split": "defender"}}}})
    with pytest.raises(ConfigError, match=r"family 'extended' reads data streams \['trx'\], which the demo does not "
                                          r"have; its TAR streams are \['retain', 'forget', 'tr'"):
        load_demo_config(overrides={"tar": {"options": {"extended": {"tr_stream_by_data": {"forget": "trx"}}}}})


def test_minimal_demo_runs_end_to_end_with_every_cell(demo_run):
    config, result, threads = demo_run
    out = Path(config.out)
    assert torch.get_num_threads() == threads  # the demo's thread setting is undone afterwards
    assert result.ran == STAGES + [f"redteam_{d}" for d in DEFENSES] and result.cached == []
    data = json.loads((out / "results.json").read_text())
    attacks = ["w03", "d01"]
    assert data["defenses"] == DEFENSES and data["attacks"] == attacks
    for defense in DEFENSES:
        for attack in attacks:
            cell = data["cells"][defense][attack]
            for key in ("safety_before", "safety_after", "capability_after"):
                assert 0.0 <= cell[key] <= 1.0
            assert cell["curve"][0][0] == 0 and cell["curve"][-1][0] == cell["steps"] == 10
        s = data["summary"][defense]
        assert s["mean"] == pytest.approx(sum(data["cells"][defense][a]["safety_after"] for a in attacks) / 2)
        assert s["worst"]["attack"] in attacks
    for stage in STAGES:
        m = data["stages"][stage]["metrics"]
        assert set(m) == set(KnowledgeEvaluator.METRICS)
        assert (out / stage / "model" / "config.json").is_file()
    # the red team's "before" of no_defense is the stage-0 model's own evaluation
    assert data["cells"]["no_defense"]["w03"]["safety_before"] == pytest.approx(
        data["stages"]["stage0"]["metrics"]["forget_B_acc"]
    )
    assert set(data["targets"]) == {"stage0", "validity", "tar_paper", "tar_extended", "extended_vs_paper"}
    assert data["targets"]["stage0"]["value"] == data["stages"]["stage0"]["metrics"]["forget_B_acc"]
    for defense in ("tar_paper", "tar_extended"):
        assert set(data["targets"][defense]) == {
            "before_forget", "before_retain_acc", "retain_loss_ratio", "auc_ratio", "moonshot"}
    assert data["cells"]["tar_paper"]["w03"]["suite"] == "weaponization"
    report = (out / "report.md").read_text()
    assert "## Targets" in report
    assert "| defense | before | w03 | d01 | mean | worst | bounded worst |" in report
    for defense in DEFENSES:
        assert f"| {defense} |" in report
    assert (out / "plots" / "b_accuracy_curves.png").is_file()
    assert (out / "redteam" / "tar_paper" / "report.md").is_file()
    # each TAR family's training log and its fight report (the adversary's loss per inner step and outer step),
    # whose heatmap holds the adv_loss/kNNN columns of the CSV log, read here on their own
    for family in ("tar_paper", "tar_extended"):
        (csv_path,) = (out / family / "logs").rglob("metrics.csv")
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        logged = {(int(r["step"]), int(c.rsplit("k", 1)[1])): float(v) for r in rows for c, v in r.items()
                  if c.startswith("train/adv_loss/k") and v not in ("", None)}
        assert {step for step, _ in logged} == set(range(config.tar.steps))  # every outer step is logged
        assert {k for _, k in logged} == set(range(config.tar.inner_steps))
        assert (out / family / "fight" / "adv_loss_heatmap.png").is_file()
        assert (out / family / "fight" / "report.md").is_file()
        assert f"![{family} adversary loss]({family}/fight/adv_loss_heatmap.png)" in report
    # during an attack only the `during` metrics are computed; before and after, all of them
    run = json.loads((out / "redteam" / "no_defense" / "runs" / "w03__seed0.json").read_text())
    steps = [step for step, _ in run["trajectory"]]
    assert steps == [0, 5, 10]
    assert set(run["trajectory"][1][1]) == set(config.redteam.during) == {"forget_B_acc", "forget_loss"}
    assert set(run["trajectory"][0][1]) == set(run["trajectory"][-1][1]) == set(KnowledgeEvaluator.METRICS)


def test_rerun_skips_finished_stages_and_reruns_only_what_changed(demo_run):
    config, first, _ = demo_run
    again = run_demo(config)
    assert again.ran == [] and again.cached == STAGES + [f"redteam_{d}" for d in DEFENSES]
    assert again.cells == json.loads(json.dumps(first.cells))
    # a TAR setting changes the TAR stages and the red team of those models only
    changed = load_demo_config(size="minimal", overrides={"out": config.out, "tar": {"steps": 1}})
    third = run_demo(changed)
    assert third.ran == ["tar_paper", "tar_extended", "redteam_tar_paper", "redteam_tar_extended"]
    assert third.cached == ["stage0", "random_mapping", "redteam_no_defense", "redteam_random_mapping"]


def _plain(value):
    return json.loads(json.dumps(value))


@pytest.mark.slow
def test_a_code_or_version_change_reruns_that_stage_and_those_after_it(demo_run, tmp_path, monkeypatch, capsys):
    """Cache keys hold the library version and the bytes of each stage's code (STAGE_CODE): the random-mapping
    module with one more comment line (a copy its ``__file__`` points to, read by the real fingerprint) reruns
    random mapping and everything after it, with the same numbers; another version reruns everything, red-team
    run files included."""
    config, first, _ = demo_run
    out = tmp_path / "copy"
    shutil.copytree(config.out, out)  # another test of this module changes config.out's TAR stages
    cfg = dataclasses.replace(config, out=str(out))
    assert random_mapping_module.__name__ in STAGE_CODE["random_mapping"]
    source = Path(random_mapping_module.__file__)
    edited = tmp_path / "edited" / source.name
    edited.parent.mkdir()
    edited.write_bytes(source.read_bytes() + b"# one more comment line\n")
    monkeypatch.setattr(random_mapping_module, "__file__", str(edited))
    capsys.readouterr()
    second = run_demo(cfg)
    printed = capsys.readouterr().out
    after_rm = ["random_mapping", "tar_paper", "tar_extended"]
    assert second.ran == after_rm + [f"redteam_{d}" for d in DEFENSES[1:]]
    assert second.cached == ["stage0", "redteam_no_defense"]
    assert "[demo] stage random_mapping: code changed since the cached run; retraining" in printed
    assert "stage tar_paper: code changed" not in printed  # it reruns because its parent did
    for stage in STAGES:
        assert second.stages[stage]["metrics"] == first.stages[stage]["metrics"], stage
    assert _plain(second.cells) == _plain(first.cells)

    monkeypatch.setattr(random_mapping_module, "__file__", str(source))  # the real code again
    old_version = tar_lightning.__version__
    run_file = out / "redteam" / "no_defense" / "runs" / "w03__seed0.json"
    written = run_file.stat().st_mtime_ns
    monkeypatch.setattr(tar_lightning, "__version__", "99.0.0")
    capsys.readouterr()
    third = run_demo(cfg)
    printed = capsys.readouterr().out
    assert third.ran == STAGES + [f"redteam_{d}" for d in DEFENSES] and third.cached == []
    for name in STAGES + [f"redteam_{d}" for d in DEFENSES]:
        again = "running it again" if name.startswith("redteam_") else "retraining"
        assert (f"[demo] stage {name}: tar_lightning version changed since the cached run "
                f"({old_version} -> 99.0.0); {again}") in printed, name
    assert run_file.stat().st_mtime_ns != written  # the red team ran again rather than reusing old run files
    assert _plain(third.cells) == _plain(first.cells)


def test_workers_give_the_same_numbers_and_resume_each_others_work(demo_run, tmp_path):
    config, first, _ = demo_run
    assert config.workers == 1
    out = tmp_path / "workers"
    parallel = load_demo_config(size="minimal", overrides={"out": str(out), "workers": 2})
    second = run_demo(parallel)
    assert sorted(second.ran) == sorted(STAGES + [f"redteam_{d}" for d in DEFENSES]) and second.cached == []
    # bit-identical: every stage's evaluation, every curve point of every attack, the summary
    for stage in STAGES:
        assert second.stages[stage]["metrics"] == first.stages[stage]["metrics"]
    assert _plain(second.cells) == _plain(first.cells)
    assert _plain(second.summary) == _plain(first.summary)
    for defense in DEFENSES:  # the red-team folders hold the same files a one-process run writes
        assert sorted(p.name for p in (out / "redteam" / defense / "runs").glob("*.json")) == [
            "d01__seed0.json", "w03__seed0.json"]
        assert (out / "redteam" / defense / "report.md").is_file()
    # one process finishes what the workers left (a removed run), and the workers what one process left
    for workers, attack in ((1, "d01"), (2, "w03")):
        (out / "redteam" / "tar_paper" / "demo_stage.json").unlink()
        (out / "redteam" / "tar_paper" / "runs" / f"{attack}__seed0.json").unlink()
        again = run_demo(dataclasses.replace(parallel, workers=workers))
        assert again.ran == ["redteam_tar_paper"] and len(again.cached) == len(STAGES) + len(DEFENSES) - 1
        assert _plain(again.cells) == _plain(first.cells)


def test_cli_runs_the_cached_demo_and_rejects_bad_input(demo_run, tmp_path, capsys):
    config, _, _ = demo_run
    # the run above left tar at 1 step in config.out; a fresh folder keeps this test independent of order
    out = tmp_path / "cli"
    assert demo_main(["--size", "minimal", "--out", str(out), "--threads", "1", "--redteam.seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "report.md" in printed and "tar_extended" in printed
    assert json.loads((out / "results.json").read_text())["defenses"] == DEFENSES
    assert demo_main(["--size", "nope", "--out", str(out)]) == 2
    assert "unknown size" in capsys.readouterr().err


def test_stage_progress_shows_the_true_total_without_escape_codes(capsys):
    from tar_lightning.demo.pipeline import StepProgress, stage_label

    bar = StepProgress(stage_label("tar_paper"), 4)
    bar.on_train_start(None, None)
    for i in range(4):
        bar.on_train_batch_end(None, None, None, None, i)
    bar.on_train_end(None, None)
    err = capsys.readouterr().err  # not a terminal: plain lines
    assert "stage 2: TAR paper: 0/4 steps (0%)" in err and "stage 2: TAR paper: 4/4 steps (100%)" in err
    assert "\r" not in err and "\x1b" not in err


def test_knowledge_evaluator_metrics():
    from tar_lightning.models import tiny_llama

    model, tok = tiny_llama()
    ev = KnowledgeEvaluator({"n_forget": 4, "n_retain": 4, "n_values": 4, "n_heldout": 1}, seq_len=32, mcq_limit=6)
    values = ev(model, tok)
    assert set(values) == set(KnowledgeEvaluator.METRICS)
    assert all(0 <= values[k] <= 1 for k in ("forget_B_acc", "forget_A_acc", "retain_acc"))
    assert values["forget_loss"] > 0
    assert set(ev(model, tok, only=["forget_B_acc"])) == {"forget_B_acc"}
    assert len(ev.items["forget_B_acc"]) == 6
    # a full evaluation is remembered per weights: the same weights are not scored again, new weights are
    computed = []
    evaluate = ev._evaluate
    ev._evaluate = lambda *a: computed.append(a[2]) or evaluate(*a)
    assert ev(model, tok) == values and computed == []
    with torch.no_grad():
        model.model.norm.weight.mul_(0.5)
    changed = ev(model, tok)
    assert changed["forget_loss"] != values["forget_loss"] and computed == [None]
    ev(model, tok, only=["forget_loss"])  # evaluations of a subset (during attacks) are never remembered
    assert computed == [None, ["forget_loss"]]
    # a stage's stored evaluation stands for its exported weights
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    ev.remember(model, tok, values)
    assert ev(model, tok) == values and computed == [None, ["forget_loss"]]
    with pytest.raises(ConfigError, match=r"remember: metrics \['retain_loss'\] are missing"):
        ev.remember(model, tok, {k: v for k, v in values.items() if k != "retain_loss"})
    del ev._evaluate
    import pickle

    assert pickle.loads(pickle.dumps(ev))._memo == {}  # worker processes get it without the memo


def test_targets_are_computed_from_the_cells_as_specified():
    from tar_lightning.demo import DemoResult

    config = load_demo_config(size="minimal")

    def cell(suite, before, after, auc):
        return {"suite": suite, "safety_before": before, "safety_after": after, "auc": auc}

    res = DemoResult(config=config, out_dir=Path("."))
    res.cells = {
        "random_mapping": {"w03": cell("weaponization", 0.30, 0.50, 0.20), "w08": cell("weaponization", 0.3, 0.4, 0.10),
                           "d01": cell("durability", 0.30, 0.35, 0.05)},
        "tar_paper": {"w03": cell("weaponization", 0.26, 0.40, 0.10), "w08": cell("weaponization", 0.26, 0.3, 0.05),
                      "d01": cell("durability", 0.26, 0.30, 0.04)},
        "tar_extended": {"w03": cell("weaponization", 0.25, 0.33, 0.06), "w08": cell("weaponization", 0.25, 0.3, 0.02),
                         "d01": cell("durability", 0.25, 0.26, 0.01)},
    }
    res.summary = {
        "random_mapping": {"before": 0.3, "before_retain": 0.97, "before_retain_loss": 1.0},
        "tar_paper": {"before": 0.26, "before_retain": 0.96, "before_retain_loss": 1.2},
        "tar_extended": {"before": 0.31, "before_retain": 0.94, "before_retain_loss": 1.1},
    }
    t = demo_targets(res)
    assert t["validity"]["value"] == pytest.approx(0.20) and t["validity"]["met"] is True
    # paper: AUC (0.10+0.05)/2 / ((0.20+0.10)/2) = 0.5 -> met; retain loss 1.2 > 1.15 -> not met
    assert t["tar_paper"]["auc_ratio"]["value"] == pytest.approx(0.5) and t["tar_paper"]["auc_ratio"]["met"] is True
    assert t["tar_paper"]["retain_loss_ratio"]["met"] is False
    assert t["tar_paper"]["before_forget"]["met"] is True  # 0.26 <= 0.25 + 0.05
    assert t["tar_paper"]["moonshot"]["value"] == pytest.approx(0.40) and t["tar_paper"]["moonshot"]["met"] is False
    # extended: B before 0.31 > 0.30 and retain MCQ 0.94 < 0.95 -> not met; worst after 0.33 <= 0.35 -> moonshot met
    assert t["tar_extended"]["before_forget"]["met"] is False
    assert t["tar_extended"]["before_retain_acc"]["met"] is False
    assert t["tar_extended"]["moonshot"]["met"] is True
    assert t["extended_vs_paper"]["value"] == pytest.approx(0.01) and t["extended_vs_paper"]["threshold"] == 0.04
    assert t["extended_vs_paper"]["met"] is True
    assert "stage0" not in t  # no evaluation of stage 0: not judged
    # stage 0 learned the world: its stage evaluation's facts-B accuracy >= 0.9
    res.stages["stage0"] = {"metrics": {"forget_B_acc": 0.95}}
    st0 = demo_targets(res)["stage0"]
    assert st0["value"] == pytest.approx(0.95) and st0["met"] is True and st0["every_seed"] is True
    res.stages["stage0"] = {"metrics": {"forget_B_acc": 0.71}}  # SmolLM2 training seed 1's stage 0
    assert demo_targets(res)["stage0"]["value"] == pytest.approx(0.71) and demo_targets(res)["stage0"]["met"] is False


def test_the_lr_multiplier_scales_fine_tuning_lrs_and_sweep_ranges_only():
    """The suites' fine-tuning LRs (and search/sweep LR ranges) are for 8B models and get the demo's multiplier;
    an activation perturbation's LR (units of its radius) and Adadelta's (a factor of a self-normalised step) do not."""
    from tar_lightning.demo.suite import build_suite
    from tar_lightning.evaluation.suite import load_suite

    attacks = {"weaponization": ["w03", "w27", "w28"], "heldout_attacks": ["h03"], "durability": ["d08"]}
    cfg = load_demo_config(size="minimal", overrides={"redteam": {"attacks": attacks}})
    m = cfg.redteam.lr_multiplier
    built = {a.id: a for a in build_suite(cfg).attacks}
    shipped = {a.id: a for name, ids in attacks.items() for a in load_suite(name).select(ids).attacks}
    assert m == 50.0
    assert built["w03"].adversary.lr == pytest.approx(shipped["w03"].adversary.lr * m)
    assert built["w27"].sweep.lr == pytest.approx(tuple(x * m for x in shipped["w27"].sweep.lr))
    assert built["d08"].search.lr == pytest.approx(tuple(x * m for x in shipped["d08"].search.lr))
    assert built["w28"].adversary.lr == shipped["w28"].adversary.lr  # embedding: units of the radius
    assert shipped["h03"].adversary.optimizer == "adadelta" and built["h03"].adversary.lr == shipped["h03"].adversary.lr


def test_the_tar_stage_builds_exactly_the_streams_the_configuration_is_checked_against():
    from tar_lightning.demo.config import TAR_STREAMS
    from tar_lightning.demo.pipeline import tar_streams

    cfg = load_demo_config(size="minimal")
    assert list(tar_streams(cfg.world, "labels")) == list(TAR_STREAMS)


def test_families_on_the_defenders_halves_train_and_are_red_teamed(demo_run):
    """``forget_split: defender``: every adversary on ``forget`` trains on the defender's half D1, TR on D2;
    ``defender_alternating``: each runs once per half (D1, D2) with the TR loss on the other half. Both families
    train and are red-teamed next to the cached stages."""
    config, _, _ = demo_run
    family = config.tar.families["extended"]
    base = config.tar.options.get("extended", {})
    options = {"ext_d": {**base, "forget_split": "defender"}, "ext_alt": {**base, "forget_split": "defender_alternating"}}
    cfg = load_demo_config(size="minimal", overrides={
        "out": config.out, "tar": {"run": ["ext_d", "ext_alt"], "families": {"ext_d": family, "ext_alt": family},
                                   "options": options}})
    on_forget = [a["name"] for a in family if a.get("data", "forget") == "forget"]
    assert on_forget
    fixed = cfg.tar.tar_config("ext_d")
    assert [a.name for a in fixed.adversaries] == [a["name"] for a in family]
    assert {a.data for a in fixed.adversaries if a.name in on_forget} == {"forget_D1"}
    assert fixed.tr_stream_by_data == {"forget_D1": "tr_D2"}
    alternating = cfg.tar.tar_config("ext_alt")
    assert [a.name for a in alternating.adversaries if "@" in a.name] == [
        f"{name}@{half}" for name in on_forget for half in ("D1", "D2")]
    assert alternating.tr_stream_by_data == {"forget_D1": "tr_D2", "forget_D2": "tr_D1"}
    for tar in (fixed, alternating):
        assert "forget" not in tar.stream_steps() and "tr" not in tar.stream_steps()
    result = run_demo(cfg)
    assert result.ran == ["tar_ext_d", "tar_ext_alt", "redteam_tar_ext_d", "redteam_tar_ext_alt"]
    assert {"tar_ext_d", "tar_ext_alt"} <= set(result.cells)
