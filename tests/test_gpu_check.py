"""benchmarks/gpu_check.py --tiny: the CPU smoke test of the prepared GPU check (FSDP2, bf16 policy, one rank)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    for key in ("MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["sharded"] and r["global_step"] == 2 and len(r["outer_step_seconds_all"]) == 2
    assert r["param_dtypes_in_forward"] == ["bfloat16"] and r["master_param_dtypes"] == ["float32"]
    assert r["restore_attacked_the_weights"] and r["restore_bit_exact"]
    # tiny Llama: hidden 64, 2 layers, tiny tokenizer; per outer step 2 adversary + 2 TR + 1 retain passes of 2x32
    assert r["token_passes_per_outer_step"] == (2 + 2 + 1) * 2 * 32
    n_m = r["matmul_parameters"]
    assert r["model_flops_per_outer_step"] == 6 * n_m * 320 + 2 * n_m * 64
    assert r["tokens_per_s"] == pytest.approx(320 / r["seconds_per_outer_step"])
    assert r["mfu"] is None and r["peak_memory_gib"] is None  # CPU: no bf16 peak, no CUDA allocator


def test_bf16_peak_table():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_check import bf16_peak
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak("NVIDIA H200") == 989e12
    assert bf16_peak("Tesla T4") is None
