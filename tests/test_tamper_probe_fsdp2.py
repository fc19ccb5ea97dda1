"""TamperProbe under FSDP2: every rank probes the live sharded model in place and in lockstep.

The runs are tests/dist_scripts/tamper_probe_fsdp2.py (a TAR fit with two probes: a full-parameter attack on the
training batch's rows with MCQ scoring after every outer step, and a LoRA attack on the same rows evaluated on a
synthetic source every 2 steps) on one process (the deep-copy path) and on 2 gloo CPU processes under Lightning's
ModelParallelStrategy.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch_env
from test_fsdp2_core import write_mcq

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "tamper_probe_fsdp2.py"
METRICS = ("forget_loss_before", "forget_loss", "forget_loss_drop", "attack_loss_first", "attack_loss_last")


def run_probe_script(devices: int, out: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    env = launch_env()
    cmd = [sys.executable, str(SCRIPT), "--devices", str(devices), "--steps", "3", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    params = [torch.load(out / f"params.rank{r}.pt") for r in range(devices)]
    records = [json.loads((out / f"probe.rank{r}.json").read_text()) for r in range(devices)]
    return params, records


def assert_same_probe_metrics(rec: dict, ref: dict) -> None:
    """Both probes' histories in ``rec`` equal ``ref``'s: the same steps and keys, MCQ accuracies exactly, losses
    within 5e-5 (the float reduction order of the sharded training and attack)."""
    for prefix in ("probe", "probe_lora"):
        ours, want_all = rec["history"][prefix], ref["history"][prefix]
        assert ours and [h["step"] for h in ours] == [h["step"] for h in want_all]
        for got, want in zip(ours, want_all, strict=True):
            assert got.keys() == want.keys()
            for k in want:
                if k.startswith("mcq_acc"):
                    assert got[k] == want[k], (prefix, got["step"], k)
                else:
                    assert got[k] == pytest.approx(want[k], abs=5e-5), (prefix, got["step"], k)


@pytest.mark.slow  # one 1-process and two 2-process runs (~50 s)
def test_tamper_probe_under_fsdp2_logs_the_single_process_metrics_and_leaves_training_untouched(tmp_path):
    """Before: under FSDP2 the probe was skipped with a warning and logged nothing.

    Measured (this machine, torch 2.13 CPU): the FSDP2 probe metrics differ from the one-process probe's by at most
    3.0e-6 (full-parameter probe) and 7.2e-7 (LoRA probe), from the float reduction order of the sharded training
    and attack, hence ``abs=5e-5``; without averaging the LoRA adapters' gradients over ranks the LoRA probe's
    losses differ by 1.7e-3. The MCQ accuracies are equal; the final weights equal those of the same FSDP2 run
    without probes bit for bit (and those of the one-process run within 8.5e-6)."""
    mcq = write_mcq(tmp_path / "mcq.json")
    (single,), (one,) = run_probe_script(1, tmp_path / "one", "--probe", "--mcq", str(mcq))
    (probed0, probed1), (rec0, rec1) = run_probe_script(
        2, tmp_path / "probed", "--strategy", "fsdp2", "--probe", "--mcq", str(mcq))
    (plain0, plain1), _ = run_probe_script(2, tmp_path / "plain", "--strategy", "fsdp2")

    # (3) the fit went on after every probe (probes after outer steps 1 and 2 were followed by training steps)
    assert rec0["global_step"] == rec1["global_step"] == 3
    assert [h["step"] for h in rec0["history"]["probe"]] == [1, 2, 3]
    assert [h["step"] for h in rec0["history"]["probe_lora"]] == [2]

    # (1) rank 0 logged the probe metrics, rank 1 logged none; both ranks computed the same values
    logged = {(row["step"], k) for row in rec0["logged"] for k in row if k != "step"}
    for prefix, steps in (("probe", (0, 1, 2)), ("probe_lora", (1,))):
        for s in steps:
            for m in METRICS:
                assert (s, f"{prefix}/{m}") in logged, (s, prefix, m)
    assert {k for row in rec0["logged"] for k in row} >= {"probe/mcq_acc_before", "probe/mcq_acc"}
    assert rec1["logged"] == []
    assert rec0["history"] == rec1["history"]
    assert rec0["callback_metrics"] == rec1["callback_metrics"]
    assert "probe/forget_loss" in rec0["callback_metrics"] and "probe_lora/forget_loss" in rec0["callback_metrics"]

    # ... and equal to the one-process probe's metrics
    assert_same_probe_metrics(rec0, one)
    # the attack moved the weights (the metrics are not a no-op's)
    assert all(h["forget_loss"] != h["forget_loss_before"] for h in rec0["history"]["probe"])

    # (2) the probes left training untouched: the same weights as the FSDP2 run without probes, bit for bit
    for k in plain0:
        assert torch.equal(probed0[k], plain0[k]) and torch.equal(probed1[k], plain1[k]), k
    # and close to the one-process run (the probe does not perturb the comparison either)
    assert max((single[k] - probed0[k]).abs().max().item() for k in single) < 1e-4  # measured 8.5e-6
    # no gradients or LoRA adapters left behind on any rank
    assert rec0["grads"] == rec1["grads"] == 0 and rec0["lora_modules"] == rec1["lora_modules"] == 0

    # a probe called directly after the fit, the live model in eval mode: weights (full tensors, bit for bit),
    # global RNG, eval mode and .grad as before, every trainable parameter a sharded DTensor again
    for rec in (rec0, rec1):
        direct = rec["direct"]
        assert "forget_loss" in direct["metrics"] and "mcq_acc" in direct["metrics"]
        assert direct["weights_untouched"] and direct["rng_untouched"] and direct["eval_mode_kept"]
        assert direct["grads_none"] and direct["all_sharded"]
    assert one["direct"]["weights_untouched"] and one["direct"]["rng_untouched"] and one["direct"]["eval_mode_kept"]


@pytest.mark.slow  # one 1-process and one 2-process run (~35 s)
def test_micro_batched_probe_attacks_under_fsdp2_match_the_whole_batch_single_process_probe(tmp_path):
    """``micro_batch_size`` under FSDP2: each rank's attack step runs its 2 rows in 2 passes of 1 row, gradients
    accumulated (and reduced over ranks) before the step: the same probe metrics as the one-process probe on the
    whole batch, for the full-parameter and the LoRA probe, and the same trained weights. Both probes use plain
    SGD here, so a gradient scaled wrongly (a part's weight missing or doubled, a second average over ranks) moves
    the metrics; AdamW would hide it. The rows are of equal length: the token weighting of unequal parts is
    checked against a hand-written reference in tests/test_micro_batch.py."""
    mcq = write_mcq(tmp_path / "mcq.json")
    (single,), (one,) = run_probe_script(1, tmp_path / "one", "--probe", "--probe_sgd", "--mcq", str(mcq))
    (micro0, _), (rec0, rec1) = run_probe_script(
        2, tmp_path / "micro", "--strategy", "fsdp2", "--probe", "--probe_sgd", "--mcq", str(mcq),
        "--micro_batch_size", "1")
    # the passes ran: 2 one-row passes per attack step (3 probes x 3 steps + 1 LoRA probe x 2 steps) on every
    # rank, and none in the whole-batch run (its grad-enabled passes are the TAR step's and the probes' 4 rows)
    assert rec0["grad_rows"]["1"] == rec1["grad_rows"]["1"] == 2 * (3 * 3 + 1 * 2)
    assert "1" not in one["grad_rows"] and set(one["grad_rows"]) == {"4"}
    assert rec0["history"] == rec1["history"]
    assert_same_probe_metrics(rec0, one)
    assert all(h["forget_loss"] != h["forget_loss_before"] for h in rec0["history"]["probe"])
    assert max((single[k] - micro0[k]).abs().max().item() for k in single) < 1e-4
    # nothing accumulated is left behind on any rank
    for rec in (rec0, rec1):
        assert rec["grads"] == 0 and rec["lora_modules"] == 0
        direct = rec["direct"]
        assert direct["weights_untouched"] and direct["rng_untouched"] and direct["grads_none"] and direct["all_sharded"]
