"""RMU as an opt-in defense of the demo (``rmu.enabled``): off by default without touching the other stages'
cache keys, trained from the stage-0 model, red-teamed and reported after random mapping, cached like every
stage, the same numbers on worker processes, and configuration errors naming ``rmu.<key>``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_demo import DEFENSES, STAGES, _plain

from tar_lightning.demo import DemoPipeline, KnowledgeEvaluator, load_demo_config
from tar_lightning.demo.cli import demo_main
from tar_lightning.demo.config import RMUStage
from tar_lightning.demo.io import quiet_lightning, read_json, torch_threads
from tar_lightning.demo.pipeline import STAGE_CODE, stage_label
from tar_lightning.demo.report import SeedsResult, write_seed_results
from tar_lightning.demo.run import run_pipeline
from tar_lightning.demo.seeds import aggregate_seeds
from tar_lightning.errors import ConfigError
from tar_lightning.models import load_model, tiny_model

RMU_DEFENSES = ["no_defense", "random_mapping", "rmu", "tar_paper", "tar_extended"]
RMU_STAGES = ["stage0", "random_mapping", "rmu", "tar_paper", "tar_extended"]
ON = {"rmu": {"enabled": True}}


def _minimal(out, **overrides):
    return load_demo_config(size="minimal", overrides={"out": str(out), **ON, **overrides})


#: the code fingerprints every run of this module is keyed with, taken once: others edit the library while these
#: tests run, and a changed fingerprint retrains by design (tests/test_demo.py checks that)
CODE = DemoPipeline(load_demo_config(size="minimal")).code_fingerprints()


def _run(config):
    """``run_demo(config)`` with the stage caches keyed by :data:`CODE`."""
    with torch_threads(config.threads), quiet_lightning():
        return run_pipeline(DemoPipeline(config, code=CODE))


@pytest.fixture(scope="module")
def rmu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_rmu")
    config = _minimal(out)
    result = _run(config)
    # its results.json as written now (a later test of this module reruns the folder with RMU off)
    return config, result, json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------------ configuration
def test_rmu_is_off_by_default_and_does_not_change_the_other_stages_keys():
    config = load_demo_config()
    assert config.rmu.enabled is False
    assert dataclasses.asdict(config.rmu) == dataclasses.asdict(RMUStage())  # the shipped YAML = the defaults
    pipeline = DemoPipeline(config)
    assert "rmu" not in pipeline.keys() and "rmu" not in pipeline.defenses()
    assert list(pipeline.keys()) == STAGES and list(pipeline.defenses()) == DEFENSES
    # enabled, or with other RMU settings: one more stage, keyed on stage 0; every other key is unchanged
    keys = {k: h for k, (_, h) in pipeline.keys().items()}
    for rmu in ({"enabled": True}, {"enabled": True, "steering_coeff": 7.0}, {"steps": 5}):
        other = DemoPipeline(load_demo_config(overrides={"rmu": rmu}), code=pipeline.code_fingerprints())
        got = {k: h for k, (_, h) in other.keys().items()}
        assert {k: h for k, h in got.items() if k != "rmu"} == keys
    enabled = DemoPipeline(load_demo_config(overrides=ON), code=pipeline.code_fingerprints())
    assert list(enabled.keys()) == RMU_STAGES and list(enabled.defenses()) == RMU_DEFENSES
    key, _ = enabled.keys()["rmu"]
    assert key["parent"] == keys["stage0"] and key["config"]["steering_coeff"] == config.rmu.steering_coeff
    assert "tar_lightning.safeguards.rmu" in STAGE_CODE["rmu"]
    assert key["code"] == pipeline.code_fingerprints()["rmu"] != pipeline.code_fingerprints()["random_mapping"]
    assert stage_label("rmu") == "stage 1: RMU"
    # every preset enables it with a layer its model has (tiny: checked when the configuration loads)
    assert load_demo_config(size="minimal", overrides=ON).rmu.layer < 2
    smollm2 = load_demo_config(size="smollm2", overrides=ON)
    assert smollm2.rmu.layer < 30  # SmolLM2-135M's decoder layers (checked when the stage builds RMUModule)
    assert all(i <= smollm2.rmu.layer for i in smollm2.rmu.update_layers or [])


@pytest.mark.parametrize(("rmu", "message"), [
    ({"layer": 2}, r"rmu.layer=2: expected a decoder layer index in 0..1 \(the model has 2 decoder layers\)"),
    ({"steps": 0}, r"rmu.steps must be an integer >= 1, got 0"),
    ({"lr": -1.0}, r"rmu.lr must be a number > 0"),
    ({"steering_coeff": 0}, r"rmu.steering_coeff must be a number > 0, got 0"),
    ({"alpha": -5}, r"rmu.alpha must be a finite number >= 0, got -5"),
    ({"update_layers": [0, 0]}, r"rmu.update_layers=\[0, 0\]: expected a non-empty list of distinct"),
    ({"update_layers": 1}, r"rmu.update_layers must be a list, got 1"),
    ({"layer": 0, "update_layers": [0, 1]}, r"rmu.update_layers=\[0, 1\]: \[1\] outside 0..0; layers after"),
    ({"seed": -1}, r"rmu.seed must be an integer >= 0, got -1"),
    ({"update_module": ""}, r"rmu.update_module must be the name of a submodule"),
    ({"enabled": "yes"}, r"rmu.enabled must be true or false"),
    ({"stepz": 3}, r"unknown key 'stepz' in rmu"),
])
def test_bad_rmu_values_name_the_key(rmu, message):
    with pytest.raises(ConfigError, match=message):
        load_demo_config(size="minimal", overrides={"rmu": {"enabled": True, **rmu}})


def test_a_disabled_section_is_not_checked_against_the_model_and_the_cli_names_the_key(capsys):
    assert load_demo_config(size="minimal", overrides={"rmu": {"layer": 7}}).rmu.layer == 7  # off: not used
    with pytest.raises(ConfigError, match=r"rmu.update_layers=\[-1\]: \[-1\] outside 0..\d"):  # checked on its own
        load_demo_config(size="minimal", overrides={"rmu": {"update_layers": [-1]}})
    assert demo_main(["--size", "minimal", "--rmu.enabled", "true", "--rmu.layer", "7", "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "rmu.layer=7: expected a decoder layer index in 0..1" in err
    assert demo_main(["--size", "minimal", "--rmu.enabled", "true", "--print_config"]) == 0
    assert "rmu:\n  enabled: true" in capsys.readouterr().out


def test_what_only_the_model_can_check_fails_at_the_stage_naming_the_key(tmp_path):
    """A model whose layer count the configuration does not know (any but the tiny one): RMUModule's own checks,
    relabelled ``rmu.<key>``, before anything trains."""
    config = _minimal(tmp_path, rmu={"enabled": True, "layer": 1})
    one_layer, tok = tiny_model("llama", seed=0, **{**config.tiny, "num_hidden_layers": 1})
    with pytest.raises(ConfigError, match=r"rmu.layer=1: expected a decoder layer index in 0..0 \(the model has 1 "):
        DemoPipeline(config).stage_rmu(one_layer, tok)
    bad_module = _minimal(tmp_path, rmu={"enabled": True, "update_module": "mlp.nope"})
    model, tok = DemoPipeline(bad_module).fresh_model()
    with pytest.raises(ConfigError, match=r"rmu.update_module='mlp.nope': decoder layer 0 .* has no such submodule"):
        DemoPipeline(bad_module).stage_rmu(model, tok)
    assert not (tmp_path / "rmu" / "model").exists()


# ------------------------------------------------------------------------------------------ end to end
def test_enabled_rmu_is_trained_red_teamed_and_reported(rmu_run):
    config, result, data = rmu_run
    out = Path(config.out)
    assert result.ran == RMU_STAGES + [f"redteam_{d}" for d in RMU_DEFENSES] and result.cached == []
    assert data["defenses"] == RMU_DEFENSES and data["config"]["rmu"]["enabled"] is True
    metrics = data["stages"]["rmu"]["metrics"]
    assert set(metrics) == set(KnowledgeEvaluator.METRICS)
    for attack in ("w03", "d01"):
        cell = data["cells"]["rmu"][attack]
        assert 0.0 <= cell["safety_after"] <= 1.0 and cell["steps"] == 10
        assert cell["safety_before"] == pytest.approx(metrics["forget_B_acc"])  # the red team attacked the RMU model
    s = data["summary"]["rmu"]
    assert s["before"] == metrics["forget_B_acc"] and s["before_retain"] == metrics["retain_acc"]
    assert s["mean"] == pytest.approx((data["cells"]["rmu"]["w03"]["safety_after"]
                                       + data["cells"]["rmu"]["d01"]["safety_after"]) / 2)
    assert set(data["targets"]) == {"stage0", "validity", "tar_paper", "tar_extended", "extended_vs_paper"}  # RMU adds no target
    # trained from stage 0 (not from random mapping): only the MLPs of layers layer-2..layer (here 0, 1) moved
    meta = read_json(out / "rmu" / "stage.json")
    assert meta["key"]["parent"] == read_json(out / "stage0" / "stage.json")["hash"]
    rmu_model, _ = load_model(str(out / "rmu" / "model"), dtype="float32")
    base, _ = load_model(str(out / "stage0" / "model"), dtype="float32")
    base_weights = dict(base.named_parameters())
    moved = {n for n, p in rmu_model.named_parameters() if not torch.equal(p, base_weights[n])}
    assert moved and all(n.startswith(("model.layers.0.mlp.", "model.layers.1.mlp.")) for n in moved), moved
    report = (out / "report.md").read_text()
    assert "| rmu |" in report and "`rmu`: the WMDP paper's RMU baseline" in report
    rows = [line.split(" |")[0] for line in report.splitlines() if line.startswith("| ")]
    after = rows[rows.index("| defense"):]  # the defense x attack table: RMU right after random mapping
    assert after[after.index("| random_mapping") + 1] == "| rmu"
    assert (out / "redteam" / "rmu" / "report.md").is_file()


def test_rerun_reuses_rmu_and_a_changed_rmu_config_retrains_only_rmu(rmu_run):
    config, first, _ = rmu_run
    again = _run(config)
    assert again.ran == [] and again.cached == RMU_STAGES + [f"redteam_{d}" for d in RMU_DEFENSES]
    assert _plain(again.cells) == _plain(first.cells)
    changed = _minimal(config.out, rmu={"enabled": True, "steering_coeff": 3.0})
    third = _run(changed)
    assert third.ran == ["rmu", "redteam_rmu"]
    assert third.cached == STAGES + [f"redteam_{d}" for d in DEFENSES]
    assert third.stages["rmu"]["metrics"] != first.stages["rmu"]["metrics"]
    assert {d: c for d, c in _plain(third.cells).items() if d != "rmu"} == {
        d: c for d, c in _plain(first.cells).items() if d != "rmu"}
    # disabled again (the default): no RMU stage or defense, nothing retrained
    off = _run(load_demo_config(size="minimal", overrides={"out": config.out}))
    assert off.ran == [] and "rmu" not in off.stages and "rmu" not in off.cells
    data = json.loads((Path(config.out) / "results.json").read_text())
    assert data["defenses"] == DEFENSES and "| rmu |" not in (Path(config.out) / "report.md").read_text()


def test_workers_give_the_same_rmu_numbers(rmu_run, tmp_path):
    """Worker processes train RMU from stage 0's exported model and red-team it; the other stages are copied
    from the one-process run, so only RMU and its red team run here."""
    config, first, _ = rmu_run
    out = tmp_path / "workers"
    shutil.copytree(config.out, out)
    shutil.rmtree(out / "rmu")  # another test of this module retrains it with other settings
    shutil.rmtree(out / "redteam" / "rmu")
    parallel = dataclasses.replace(config, out=str(out), workers=2)
    second = _run(parallel)
    assert sorted(second.ran) == ["redteam_rmu", "rmu"]
    assert second.stages["rmu"]["metrics"] == first.stages["rmu"]["metrics"]  # bit-identical
    assert _plain(second.cells["rmu"]) == _plain(first.cells["rmu"])
    assert _plain(second.summary["rmu"]) == _plain(first.summary["rmu"])
    # report order, whatever order the workers finished in
    assert json.loads((out / "results.json").read_text())["defenses"] == RMU_DEFENSES


def test_rmu_is_aggregated_over_training_seeds(rmu_run, tmp_path):
    """The aggregation over training seeds (``--seeds``) carries the RMU defense like any other (a second seed's
    results.json made from the first with shifted numbers)."""
    config, _, seed0 = rmu_run
    seed1 = json.loads(json.dumps(seed0))
    seed1["config"]["seed"] = 1
    for cell in seed1["cells"]["rmu"].values():
        cell["safety_after"] = min(1.0, cell["safety_after"] + 0.1)
    agg = aggregate_seeds([seed0, seed1])
    assert agg["defenses"] == RMU_DEFENSES
    w03 = agg["cells"]["rmu"]["w03"]["safety_after"]
    assert w03["per_seed"] == [seed["cells"]["rmu"]["w03"]["safety_after"] for seed in (seed0, seed1)]
    assert agg["before"]["rmu"]["before"]["mean"] == pytest.approx(seed0["summary"]["rmu"]["before"])
    seeds_cfg = dataclasses.replace(config, seeds=[0, 1], out=str(tmp_path))
    res = SeedsResult(config=seeds_cfg, out_dir=tmp_path, aggregate=agg)
    write_seed_results(res)
    report = (tmp_path / "report.md").read_text()
    assert report.count("| rmu |") >= 3  # before, after, spread and retain tables
