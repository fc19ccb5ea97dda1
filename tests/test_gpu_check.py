"""benchmarks/gpu_check.py: the ``--tiny`` CPU path of the GPU check (every phase, the JSON schema, the restore and
validation checks, the time budget, the JSON written after each phase) and its arithmetic."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

sys.path.insert(0, str(SCRIPT.parent))
try:
    import gpu_check
finally:
    sys.path.remove(str(SCRIPT.parent))

STEP_PHASES = ("finetune", "floor", "tar_single", "tar_fsdp2", "tar_fsdp2_cpu_snapshot", "tar_fsdp2_checkpointing")


def run_script(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--tiny`` run of every phase in a subprocess (shared by the tests below; ~15-20 s on a loaded 2-core
    CPU, so not marked slow: it is the CPU run of the whole check)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    proc = run_script(tmp, "--out", str(out))
    return json.loads(out.read_text()), proc.stdout


def test_tiny_run_has_every_phase_with_its_fields(tiny_run):
    r, _ = tiny_run
    assert list(r["phases"]) == list(gpu_check.PHASES)
    failed = {n: p.get("reason") for n, p in r["phases"].items() if p["status"] != "ok"}
    assert not failed
    cal = r["phases"]["calibration"]
    assert cal["matmul_tflops"] > 0 and cal["copy_gb_s"] > 0 and len(cal["matmul_step_seconds"]) == 2
    shape, n_m = r["model"], r["model"]["matmul_parameters"]
    per_token = 6 * n_m + 12 * shape["layers"] * shape["hidden"] * shape["seq"]
    for name in STEP_PHASES:
        p = r["phases"][name]
        assert set(gpu_check.STEP_FIELDS) <= set(p), name
        assert len(p["outer_step_seconds"]) == 2, name  # after 1 warm-up step
        assert p["seconds_per_outer_step"] == pytest.approx(sum(p["outer_step_seconds"]) / 2)
        assert p["tokens_per_s"] == pytest.approx(p["token_passes_per_outer_step"] / p["seconds_per_outer_step"])
        assert p["tflops"] == pytest.approx(p["model_flops_per_outer_step"] / p["seconds_per_outer_step"] / 1e12)
        assert p["mfu_calibrated"] == pytest.approx(p["tflops"] / cal["matmul_tflops"])
        # CPU: no datasheet peak, no CUDA allocator; the process's peak RSS instead
        assert p["mfu_datasheet"] is None and p["peak_allocated_gib"] is None and p["peak_rss_gib"] > 0
    # tiny shapes: K=4 adversary passes of 2x32 tokens; TARModule adds 2 TR + 1 retain passes of 2x32 (+ reference)
    assert r["phases"]["finetune"]["token_passes_per_outer_step"] == 4 * 2 * 32
    assert r["phases"]["floor"]["token_passes_per_outer_step"] == (4 + 2 + 1) * 2 * 32
    assert r["phases"]["tar_single"]["model_flops_per_outer_step"] == per_token * 7 * 64 + per_token // 3 * 64
    for name in STEP_PHASES[2:]:
        assert r["phases"][name]["global_step"] == 3
        assert r["phases"][name]["master_param_dtypes"] == ["float32"]
    for name in STEP_PHASES[3:]:  # FSDP2: sharded, the bf16 policy all-gathers bf16 weights for the forward
        assert r["phases"][name]["sharded"] and r["phases"][name]["param_dtypes_in_forward"] == ["bfloat16"]
    assert not r["phases"]["tar_single"]["sharded"]


def test_tiny_run_ratios_projection_and_table(tiny_run):
    r, stdout = tiny_run
    sec = {n: r["phases"][n]["seconds_per_outer_step"] for n in STEP_PHASES}
    ratios = r["ratios"]
    assert ratios["tar_single_over_floor"] == pytest.approx(sec["tar_single"] / sec["floor"])
    assert ratios["floor_over_finetune"] == pytest.approx(sec["floor"] / sec["finetune"])
    assert ratios["fsdp2_over_single"] == pytest.approx(sec["tar_fsdp2"] / sec["tar_single"])
    assert ratios["cpu_snapshot_over_fsdp2"] == pytest.approx(sec["tar_fsdp2_cpu_snapshot"] / sec["tar_fsdp2"])
    assert ratios["checkpointing_time_over_fsdp2"] == pytest.approx(sec["tar_fsdp2_checkpointing"] / sec["tar_fsdp2"])
    assert ratios["checkpointing_memory_over_fsdp2"] is None  # CPU: no allocator peak to compare
    proj = r["projection"]
    assert proj["rate_from"] == "tar_fsdp2" and proj["gpus"] == 8 and proj["outer_steps"] == 750
    assert proj["tflops_per_gpu"] == pytest.approx(r["phases"]["tar_fsdp2"]["tflops"])
    assert proj["seconds_per_outer_step"] == pytest.approx(proj["flops_per_outer_step_per_gpu"] / proj["tflops_per_gpu"]
                                                           / 1e12)
    assert proj["hours"] == pytest.approx(proj["seconds_per_outer_step"] * 750 / 3600)
    assert proj["gpu_hours"] == pytest.approx(proj["hours"] * 8)
    assert "× 750 steps" in proj["arithmetic"] and f"{proj['hours']:.2f} h" in proj["arithmetic"]
    for name in gpu_check.PHASES:
        assert f"| {name} | ok |" in stdout
    assert "projection: per GPU per outer step" in stdout


def test_tiny_run_restore_and_validation_checks(tiny_run):
    r, _ = tiny_run
    checks = r["phases"]["checks"]
    assert checks["attack_changed_logits"]  # the attack moved the weights ...
    assert checks["restore_logits_equal"] and checks["restore_max_abs_diff"] == 0.0  # ... and restore undid it
    assert checks["validation_then_training_step"]


def test_tiny_run_profile_covers_the_outer_step(tiny_run):
    r, _ = tiny_run
    prof = r["phases"]["profile"]
    parts = prof["parts_seconds"]
    assert list(parts) == list(gpu_check.PROFILE_PARTS)
    # every range was hit (the wrappers found the library's seams), and the disjoint parts fit in the step
    assert all(parts[k] > 0 for k in gpu_check.PROFILE_PARTS if k != "gaps")
    assert parts["gaps"] >= 0
    assert sum(parts.values()) == pytest.approx(prof["outer_step_seconds"])
    assert prof["device_busy_share"] is None  # CPU


def test_phases_over_the_budget_are_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r.json"
    gpu_check.main(["--tiny", "--budget-s", "0", "--out", str(out)])
    stdout = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert list(r["phases"]) == list(gpu_check.PHASES)
    for name, p in r["phases"].items():
        assert p["status"] == "skipped" and p["reason"].startswith("over budget"), name
        assert f"| {name} | skipped (over budget" in stdout
    assert all(v is None for v in r["ratios"].values())
    assert r["projection"]["hours"] is None and r["projection"]["arithmetic"] == "no TAR phase measured"


def test_json_on_disk_after_each_phase(tmp_path, monkeypatch):
    """In process, the cheap phases: after every phase the file holds valid JSON with that phase's result."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r.json"
    seen = []

    def on_phase(name, result):
        on_disk = json.loads(out.read_text())
        assert on_disk == json.loads(json.dumps(result))
        seen.append((name, on_disk["phases"][name]["status"], sorted(on_disk["phases"])))

    r = gpu_check.main(["--tiny", "--out", str(out), "--phases", "calibration,finetune"], on_phase=on_phase)
    assert seen == [("calibration", "ok", ["calibration"]),  # on disk before the next phase started
                    ("finetune", "ok", ["calibration", "finetune"])]
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert [r["phases"][n]["status"] for n in gpu_check.PHASES[2:]] == ["not_selected"] * 7
    assert r["phases"]["finetune"]["mfu_calibrated"] == pytest.approx(
        r["phases"]["finetune"]["tflops"] / r["phases"]["calibration"]["matmul_tflops"])
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # atomic writes leave no temporary file


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "1"])
    assert "at least 2 timed outer steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--phases", "calibration,warp"])
    assert "unknown ['warp']" in capsys.readouterr().err


def test_parameter_count_formula_matches_the_models():
    """The projection's 8B count is Llama-3-8B's; the formula matches the 1B-shaped model the check builds."""
    import torch

    paper = gpu_check.PAPER
    n_8b = gpu_check.llama_matmul_parameters(paper["hidden"], paper["intermediate"], paper["layers"],
                                             paper["heads"], paper["kv_heads"], paper["vocab"])
    assert n_8b + 128256 * 4096 == 8_030_261_248  # Llama-3-8B's published parameter count
    shape = gpu_check.FULL_SHAPE
    model, _ = gpu_check.build_model(shape, torch.device("meta"))
    n_m = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert n_m == gpu_check.llama_matmul_parameters(shape["hidden"], shape["intermediate"], shape["layers"],
                                                    shape["heads"], shape["kv_heads"], shape["vocab"])
    assert model.lm_head.weight is not model.get_input_embeddings().weight  # untied head
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size) == (2048, 16, 8192)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.vocab_size) == (32, 8, 128256)


def test_union_seconds():
    assert gpu_check.union_seconds([]) == 0.0
    assert gpu_check.union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0
    assert math.isclose(gpu_check.union_seconds([(1.0, 1.5), (0.0, 0.25)]), 0.75)


def test_bf16_peak_table():
    assert gpu_check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.bf16_peak("NVIDIA H200") == 989e12
    assert gpu_check.bf16_peak("Tesla T4") is None
