"""The demo over training seeds (``tar-lightning demo --seeds 0,1``): the aggregation against numbers computed
here from hand-made per-seed results, the ``seeds`` option's errors, and (slow) the command end to end: per-seed
folders equal to single-seed runs, a rerun that only aggregates."""

from __future__ import annotations

import dataclasses
import json
import statistics
import warnings
from pathlib import Path

import pytest

from tar_lightning.cli import main
from tar_lightning.demo import DemoConfig, load_demo_config
from tar_lightning.demo.io import source_fingerprint
from tar_lightning.demo.pipeline import STAGE_CODE
from tar_lightning.demo.report import SeedsResult, write_seed_results
from tar_lightning.demo.seeds import aggregate_seeds, pooled_std
from tar_lightning.errors import ConfigError

DEFENSES = ["no_defense", "random_mapping", "tar_paper", "tar_extended"]

# ------------------------------------------------------------------------------------ hand-made results
# facts-B accuracy after each attack run: training seed -> defense -> attack -> one value per attack seed
RUNS = {
    0: {"random_mapping": {"w03": [0.40, 0.50, 0.45], "d01": [0.30, 0.28, 0.29]},
        "tar_extended": {"w03": [0.30, 0.36, 0.33], "d01": [0.25, 0.27, 0.26]}},
    1: {"random_mapping": {"w03": [0.48, 0.52, 0.47], "d01": [0.31, 0.35, 0.30]},
        "tar_extended": {"w03": [0.38, 0.34, 0.40], "d01": [0.26, 0.24, 0.28]}},
    4: {"random_mapping": {"w03": [0.41, 0.43, 0.42], "d01": [0.33, 0.29, 0.31]},
        "tar_extended": {"w03": [0.29, 0.31, 0.33], "d01": [0.27, 0.29, 0.25]}},
}
BEFORE = {0: {"random_mapping": 0.31, "tar_extended": 0.26}, 1: {"random_mapping": 0.27, "tar_extended": 0.30},
          4: {"random_mapping": 0.29, "tar_extended": 0.24}}
AUC = {0: {"random_mapping": 0.40, "tar_extended": 0.20}, 1: {"random_mapping": 0.50, "tar_extended": 0.30},
       4: {"random_mapping": 0.45, "tar_extended": 0.10}}


def _results(seed: int) -> dict:
    """One training seed's results.json as the demo writes it (the keys the aggregation reads)."""
    cells, summary = {}, {}
    for d, attacks in RUNS[seed].items():
        cells[d] = {a: {"suite": "weaponization" if a == "w03" else "durability", "seeds": 3,
                        "safety_before": BEFORE[seed][d], "safety_after": statistics.mean(v),
                        "safety_after_std": statistics.stdev(v), "capability_before": 0.97,
                        "capability_after": 0.9 - 0.01 * seed, "auc": AUC[seed][d], "broke": False,
                        "forget_A_after": 0.5, "forget_loss_after": 2.0, "curve": [[0, 0.3], [10, 0.4]]}
                    for a, v in attacks.items()}
        after = {a: statistics.mean(v) for a, v in attacks.items()}
        worst = max(after, key=after.get)
        summary[d] = {"before": BEFORE[seed][d], "before_A": 0.2, "before_retain": 0.97 + 0.01 * seed,
                      "before_forget_loss": 3.0, "before_retain_loss": 0.45, "mean": statistics.mean(after.values()),
                      "worst": {"attack": worst, "safety_after": after[worst]},
                      "bounded_worst": {"attack": None, "safety_after": None},
                      "retain_after_mean": 0.9 - 0.01 * seed}
    ext, pap = 0.1 * (seed + 1), 0.2 + 0.05 * seed  # extended_vs_paper: a threshold measured per seed
    learned = 0.71 if seed == 4 else 1.0  # seed 4's stage 0 did not learn the world (SmolLM2 training seed 1's value)
    targets = {
        "stage0": {"value": learned, "op": ">=", "threshold": 0.9, "met": learned >= 0.9, "what": "stage-0 facts-B",
                   "every_seed": True},
        "validity": {"value": after_gain(seed), "op": ">=", "threshold": 0.15, "met": after_gain(seed) >= 0.15,
                     "what": "random mapping's facts-B gain under w03"},
        "tar_extended": {"before_forget": {"value": BEFORE[seed]["tar_extended"], "op": "<=", "threshold": 0.30,
                                           "met": BEFORE[seed]["tar_extended"] <= 0.30, "what": "facts-B before"}},
        "extended_vs_paper": {"value": ext, "op": "<", "threshold": pap, "met": ext < pap, "what": "durability AUC"},
    }
    config = load_demo_config(size="minimal", overrides={"seed": seed, "out": f"x/seed{seed}"}).to_dict()
    config["redteam"]["seeds"] = 3
    return {"config": config, "safety_metric": "forget_B_acc", "capability_metric": "retain_acc", "chance": 0.25,
            "defenses": list(RUNS[seed]), "attacks": ["w03", "d01"], "cells": cells, "summary": summary,
            "targets": targets, "wall_time_s": 10.0 + seed}


def after_gain(seed: int) -> float:
    return statistics.mean(RUNS[seed]["random_mapping"]["w03"]) - BEFORE[seed]["random_mapping"]


def test_aggregation_matches_numbers_computed_by_hand():
    agg = aggregate_seeds([_results(s) for s in (0, 1, 4)])
    assert agg["training_seeds"] == [0, 1, 4] and agg["attack_seeds"] == 3
    assert agg["defenses"] == ["random_mapping", "tar_extended"] and agg["attacks"] == ["w03", "d01"]
    for d in ("random_mapping", "tar_extended"):
        for a in ("w03", "d01"):
            per_seed = [sum(RUNS[s][d][a]) / 3 for s in (0, 1, 4)]  # each seed: the mean over its attack seeds
            m = sum(per_seed) / 3
            sd = (sum((v - m) ** 2 for v in per_seed) / 2) ** 0.5  # ddof = 1 over training seeds
            every = [v for s in (0, 1, 4) for v in RUNS[s][d][a]]
            gm = sum(every) / 9
            pooled = (sum((v - gm) ** 2 for v in every) / 8) ** 0.5  # ddof = 1 over all 9 runs
            got = agg["cells"][d][a]["safety_after"]
            assert got["mean"] == pytest.approx(m, abs=1e-12) and got["std"] == pytest.approx(sd, abs=1e-12)
            assert got["min"] == pytest.approx(min(per_seed)) and got["max"] == pytest.approx(max(per_seed))
            assert got["per_seed"] == pytest.approx(per_seed) and got["n"] == 3
            assert got["pooled_std"] == pytest.approx(pooled, abs=1e-12)
        auc = agg["cells"][d]["w03"]["auc"]
        vals = [AUC[s][d] for s in (0, 1, 4)]
        assert auc["mean"] == pytest.approx(sum(vals) / 3)
        assert auc["std"] == pytest.approx((sum((v - sum(vals) / 3) ** 2 for v in vals) / 2) ** 0.5)
        before = agg["before"][d]["before"]
        assert before["per_seed"] == [BEFORE[s][d] for s in (0, 1, 4)]
        assert before["mean"] == pytest.approx(sum(BEFORE[s][d] for s in (0, 1, 4)) / 3)
        worst = agg["summary"][d]["worst"]
        assert worst["attack"] == ["w03", "w03", "w03"]
        assert worst["mean"] == pytest.approx(sum(sum(RUNS[s][d]["w03"]) / 3 for s in (0, 1, 4)) / 3)
        assert agg["summary"][d]["bounded_worst"]["mean"] is None
    # targets: judged on the mean of the per-seed values, per-seed values and verdicts kept
    gains = [after_gain(s) for s in (0, 1, 4)]
    v = agg["targets"]["validity"]
    assert v["value"] == pytest.approx(sum(gains) / 3) and v["per_seed"] == pytest.approx(gains)
    assert v["met"] == (sum(gains) / 3 >= 0.15) and v["per_seed_met"] == [g >= 0.15 for g in gains]
    # stage0 is judged on every seed: the mean (1 + 1 + 0.71) / 3 = 0.903 clears 0.9, seed 4 does not
    st0 = agg["targets"]["stage0"]
    assert st0["value"] == pytest.approx(2.71 / 3) and st0["value"] >= 0.9 and st0["every_seed"] is True
    assert st0["per_seed_met"] == [True, True, False] and st0["met"] is False
    assert aggregate_seeds([_results(s) for s in (0, 1)])["targets"]["stage0"]["met"] is True
    assert v["every_seed"] is False
    b = agg["targets"]["tar_extended"]["before_forget"]
    assert b["value"] == pytest.approx((0.26 + 0.30 + 0.24) / 3) and b["met"] is True and b["threshold"] == 0.30
    e = agg["targets"]["extended_vs_paper"]  # its threshold is measured per seed: the mean of the thresholds
    assert e["value"] == pytest.approx((0.1 + 0.2 + 0.5) / 3)
    assert e["threshold"] == pytest.approx((0.2 + 0.25 + 0.4) / 3)
    assert e["met"] is ((0.1 + 0.2 + 0.5) / 3 < (0.2 + 0.25 + 0.4) / 3)
    assert e["per_seed_met"] == [True, True, False]


def test_pooled_std_equals_the_std_of_the_runs_and_one_seed_has_no_std():
    groups = [[0.1, 0.4], [0.3], [0.2, 0.25, 0.9]]
    every = [v for g in groups for v in g]
    got = pooled_std([statistics.mean(g) for g in groups], [statistics.stdev(g) if len(g) > 1 else 0.0 for g in groups],
                     [len(g) for g in groups])
    assert got == pytest.approx(statistics.stdev(every), abs=1e-12)
    assert pooled_std([0.3], [0.0], [1]) is None
    one = aggregate_seeds([_results(1)])
    cell = one["cells"]["tar_extended"]["w03"]["safety_after"]
    assert cell["std"] is None and cell["mean"] == pytest.approx(cell["min"]) == pytest.approx(cell["max"])
    assert cell["pooled_std"] == pytest.approx(statistics.stdev(RUNS[1]["tar_extended"]["w03"]), abs=1e-12)


def test_aggregation_refuses_runs_that_do_not_belong_together():
    a, b = _results(0), _results(1)
    with pytest.raises(ConfigError, match="training seed 0 is given twice"):
        aggregate_seeds([a, _results(0)])
    b["config"]["stage0"]["steps"] = 99
    with pytest.raises(ConfigError, match="training seed 1: config key 'stage0'"):
        aggregate_seeds([a, b])
    c = _results(4)
    c["attacks"] = ["w03"]
    with pytest.raises(ConfigError, match="training seed 4: its attacks"):
        aggregate_seeds([a, c])
    with pytest.raises(ConfigError, match="no per-seed results"):
        aggregate_seeds([])
    d = _results(4)
    d["defenses"] = ["random_mapping"]
    with pytest.raises(ConfigError, match="training seed 4: its defenses"):
        aggregate_seeds([a, d])


def test_aggregation_accepts_the_same_defenses_listed_in_another_order():
    # 0.1's demo listed defenses in the order its worker processes finished, so seeds of one configuration differ
    a, b = _results(0), _results(1)
    b["defenses"] = list(reversed(b["defenses"]))
    b["cells"] = dict(reversed(list(b["cells"].items())))
    agg = aggregate_seeds([a, b])
    assert list(agg["defenses"]) == list(a["defenses"])
    assert agg["cells"]["tar_extended"]["w03"]["safety_after"]["per_seed"] == [
        a["cells"]["tar_extended"]["w03"]["safety_after"], b["cells"]["tar_extended"]["w03"]["safety_after"]]


def test_seed_report_and_plot_are_written(tmp_path):
    config = load_demo_config(size="minimal", overrides={"seeds": [0, 1, 4], "out": str(tmp_path)})
    res = SeedsResult(config=config, out_dir=tmp_path, aggregate=aggregate_seeds([_results(s) for s in (0, 1, 4)]))
    write_seed_results(res)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["folders"] == {"0": "seed0", "1": "seed1", "4": "seed4"} and data["config"]["seeds"] == [0, 1, 4]
    report = (tmp_path / "report.md").read_text()
    m = res.aggregate["cells"]["tar_extended"]["w03"]["safety_after"]
    assert f"{m['mean']:.2f} ± {m['std']:.2f} [{m['min']:.2f}–{m['max']:.2f}]" in report
    assert "## Targets (judged on the mean over training seeds)" in report and "[`seed4/report.md`]" in report
    if "b_accuracy_seeds" in res.files:  # matplotlib installed
        assert (tmp_path / "plots" / "b_accuracy_seeds.png").is_file()


# ------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("value", ["a,b", "0,0", "[-1]", "[]", "1.5", "[0, x]"])
def test_bad_seeds_give_a_one_line_error_naming_the_key(value, capsys):
    assert main(["demo", "--size", "minimal", "--seeds", value, "--print_config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seeds" in err and "training seed" in err, err


def test_seeds_parse_from_commas_or_a_list_and_a_count_still_means_attack_seeds(capsys):
    assert load_demo_config(size="minimal", overrides={"seeds": "0, 1,2"}).seeds == [0, 1, 2]
    assert load_demo_config(size="minimal", overrides={"seeds": [3]}).seeds == [3]
    assert load_demo_config(size="minimal").seeds is None  # the default: one run with `seed`
    with pytest.warns(FutureWarning, match="use --redteam.seeds 2"):  # 0.1's --seeds N
        old = load_demo_config(size="minimal", overrides={"seeds": 2})
    assert old.seeds is None and old.redteam.seeds == 2
    with pytest.raises(ConfigError, match="--seeds 0: one number is 0.1's count of attack seeds .* for training seed 0 "
                                          "use --seed 0, for a list of training seeds --seeds 0,1,2"):
        load_demo_config(size="minimal", overrides={"seeds": 0})  # a user who meant training seed 0
    with pytest.raises(ConfigError, match="seeds must be a list of training seeds .* 3 attack seeds per attack are "
                                          "redteam.seeds, one training seed is seed"):
        DemoConfig.from_dict({"seeds": 3})


# ------------------------------------------------------------------------------------------ end to end
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _numbers(res: dict) -> dict:
    return {"cells": res["cells"], "summary": res["summary"], "targets": res["targets"],
            "metrics": {k: v["metrics"] for k, v in res["stages"].items() if "metrics" in v}}


def _code() -> dict:
    """The source fingerprints the stage caches are keyed by."""
    return {kind: source_fingerprint(modules) for kind, modules in STAGE_CODE.items()}


@pytest.mark.slow
def test_seeds_command_end_to_end(tmp_path, capsys):
    """``tar-lightning demo --size minimal --seeds 0,1``: per-seed folders, each equal to a ``--seed N`` run;
    the aggregate; a rerun that trains nothing and only aggregates."""
    out = tmp_path / "demo_seeds"
    code = _code()
    assert main(["demo", "--size", "minimal", "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "`seeds` wins: `seed` 0 is not used" in printed
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("seed")) == ["seed0", "seed1"]
    per_seed = [_json(out / f"seed{s}" / "results.json") for s in (0, 1)]
    assert [r["config"]["seed"] for r in per_seed] == [0, 1] and all(r["config"]["seeds"] is None for r in per_seed)
    assert all(r["cached"] == [] for r in per_seed)  # every stage of both seeds was trained
    agg = _json(out / "results.json")
    assert agg["training_seeds"] == [0, 1] and agg["folders"] == {"0": "seed0", "1": "seed1"}
    assert agg["defenses"] == DEFENSES and (out / "report.md").is_file()
    for d in DEFENSES:
        for a in ("w03", "d01"):
            vals = [r["cells"][d][a]["safety_after"] for r in per_seed]
            cell = agg["cells"][d][a]["safety_after"]
            assert cell["per_seed"] == vals and cell["mean"] == pytest.approx(sum(vals) / 2)
            assert cell["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    # the same command again: every stage of every seed is reused (nothing retrained), the aggregate is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/stage.json")}
    stamps.update({p: p.stat().st_mtime_ns for p in out.glob("seed*/redteam/*/runs/*.json")})
    assert len(stamps) == 2 * (4 + 4 * 2)
    assert main(["demo", "--size", "minimal", "--seeds", "0,1", "--out", str(out)]) == 0
    again = [_json(out / f"seed{s}" / "results.json") for s in (0, 1)]
    if _code() == code:  # the cache is keyed by the source (STAGE_CODE): an edit of this checkout meanwhile reruns
        assert all(r["ran"] == [] for r in again) and {p: p.stat().st_mtime_ns for p in stamps} == stamps
        assert _json(out / "results.json")["cells"] == agg["cells"]
    else:
        warnings.warn("the library's source changed while this test ran: the rerun retrained by design, the "
                      "no-retraining check was not made", stacklevel=1)
    # a seed folder holds what the single-seed command writes
    single = tmp_path / "single1"
    assert main(["demo", "--size", "minimal", "--seed", "1", "--out", str(single)]) == 0
    assert _numbers(_json(single / "results.json")) == _numbers(per_seed[1])


# ------------------------------------------------------------------------------------ the shipped variants overlay
VARIANTS = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tar_variants.yaml"


def test_tar_variants_overlay_compares_at_equal_compute():
    """``recipes/demo/tar_variants.yaml`` (the command of RESULTS.md's table of TAR variants): every variant costs
    the shipped extended family's forward+backward passes per outer step (adversary steps + TR evaluations +
    retain), and the options are the documented ones."""
    import yaml

    from tar_lightning.demo.config import DEFAULT_CONFIG, demo_config_from_layers

    layers = [(DEFAULT_CONFIG, yaml.safe_load(DEFAULT_CONFIG.read_text())), (VARIANTS, yaml.safe_load(VARIANTS.read_text()))]
    tar = demo_config_from_layers(layers, {}).tar
    assert tar.run == ["extended", "ext_delta"]
    configs = {f: tar.tar_config(f) for f in ("extended", "ext_delta", "ext_norm30", "mudman30")}

    def passes(c) -> int:
        return c.trajectories * (c.inner_steps + len(c.tr_points())) + 1

    assert {f: passes(c) for f, c in configs.items()} == dict.fromkeys(configs, 21)
    ext, delta, norm, mud = configs.values()
    # the shipped extended family continues whole attacks; its ablation differs in what a continuation takes over
    assert ext.persistent_state == "full" and ext.long_horizon() and ext.attack_horizon() == 320
    assert ext.weighting_rate == 0.0125
    assert delta.persistent_state == "delta" and not delta.long_horizon() and delta.weighting_rate == 0.0625
    assert dataclasses.replace(delta, persistent_state="full", weighting_rate=0.0125) == ext
    assert (ext.persistent_pool, ext.persistent_horizon, ext.retain_weight) == (4, 320, 2.0)
    assert ext.adversaries == delta.adversaries == norm.adversaries  # the same five adversaries
    assert norm.normalize_tr_grad and norm.tr_weight == 30.0 and norm.persistent_state == "delta"
    assert mud.fork_every == 32 and mud.attack_horizon() == 320 and mud.disruption_mask and mud.normalize_tr_grad
    assert [a.name for a in mud.adversaries] == ["adamw_forget"]


@pytest.mark.slow  # the minimal demo with four TAR families
def test_tar_variants_overlay_runs_as_documented(tmp_path, capsys):
    """The documented command at the minimal size, every variant at once (one attack seed to stay cheap)."""
    out = tmp_path / "variants"
    args = ["demo", "--size", "minimal", "--config", str(VARIANTS), "--tar.run", "[extended,ext_delta,ext_norm30,mudman30]",
            "--redteam.seeds", "1", "--out", str(out)]
    assert main(args) == 0
    result = _json(out / "results.json")
    assert result["defenses"] == ["no_defense", "random_mapping", "tar_extended", "tar_ext_delta", "tar_ext_norm30",
                                  "tar_mudman30"]
    assert result["attacks"] == ["w03", "w16"]
    assert "K=10" in capsys.readouterr().out  # mudman30's own inner steps, not the stage's
