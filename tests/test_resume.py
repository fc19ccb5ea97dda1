"""Exact resume: a TAR fit and a red team SIGKILLed at several points end bit-identical to uninterrupted runs.

Each test runs one driver script (tests/resume_scripts/) as a subprocess; the driver forks one child per run, so
the heavy imports are paid once. A child dies by SIGKILL at a deterministic point (a forward pass inside the
inner loop, a TR evaluation, the retain loss, during a checkpoint save, between writing a checkpoint and its
atomic rename; mid-attack for the red team) and the next child resumes from what is on disk.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tar_lightning.checkpoint import load_checkpoint

SCRIPTS = Path(__file__).resolve().parent / "resume_scripts"
SRC = Path(__file__).resolve().parents[1] / "src"

# The tiny fit: 8 outer steps, 3 steps per data epoch, K=4, tr_every=2, one trajectory: 7 forward passes of the
# policy per outer step, in this order: adversary k0, k1, TR, adversary k2, k3, TR, retain.
# Each kill counts forward passes from the start of its own run (which resumes from the previous last.ckpt).
FIT_KILLS = [
    ("forward:17", 0, 2),  # no checkpoint yet; dies in outer step 2 at adversary step k2 (mid inner loop)
    ("forward:9", 2, 3),  # resumes at 2; dies in step 3 at the TR evaluation after k1
    ("save:5", 3, 4),  # resumes at 3 (an epoch boundary); dies inside the checkpoint save of step 5
    ("rename:6", 4, 5),  # resumes at 4; dies after writing step 6's checkpoint, before its rename
    ("forward:13", 5, 6),  # resumes at 5; dies in step 6 at the retain loss
    ("forward:0", 6, 6),  # resumes at 6 (an epoch boundary); dies in the very first forward pass
]


def run_driver(script: str, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_identical(a, b, path="") -> int:
    """Recursively torch.equal / == ; returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        return sum(assert_identical(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(assert_identical(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    assert a == b, (path, a, b)
    return 0


@pytest.mark.slow  # ~60 s of CPU: 8 tiny fits
def test_tar_fit_killed_six_times_resumes_bit_identically(tmp_path):
    run_driver("fit.py", "--work", str(tmp_path), "--max-steps", "8", "--kills", ",".join(k for k, _, _ in FIT_KILLS))
    log = json.loads((tmp_path / "log.json").read_text())
    assert log[0] == {"run": "reference", "status": "exit:0"}
    kills = log[1:-1]
    assert len(kills) == len(FIT_KILLS) >= 5
    for entry, (spec, resumed_from, last_after) in zip(kills, FIT_KILLS, strict=True):
        assert entry["run"] == spec
        assert entry["status"] == "signal:SIGKILL", entry
        assert entry["resumed_from"] == (resumed_from or None), entry
        assert entry["last_after"] == last_after, entry
    # the kill between write and rename left its temporary file; the checkpoints themselves are intact
    assert kills[3]["temp_files"] and kills[3]["temp_files"][0].endswith(".tmp")
    assert log[-1] == {"run": "final", "status": "exit:0", "resumed_from": 6}

    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    resumed = torch.load(tmp_path / "interrupted.pt", weights_only=True)
    assert reference["resumed_from"] is None and resumed["resumed_from"] == 6
    reference.pop("resumed_from"), resumed.pop("resumed_from")
    n = assert_identical(reference, resumed)
    assert n > 2 * len(reference["weights"])  # weights and the optimizer's per-parameter state were compared
    # what was compared is the real end state of 8 steps: schedule-free state, LR schedule, data, monitor
    assert reference["global_step"] == 8 and reference["data"] == {"next_step": 8}
    assert reference["scheduler"]["last_epoch"] == 8
    assert all(g["train_mode"] is False for g in reference["optimizer"]["param_groups"])  # eval point after fit
    assert len(reference["monitor"]["baseline_values"]) == 2 and reference["monitor"]["ema"] is not None
    assert reference["optimizer"]["param_groups"][0]["k"] == 8  # schedule-free step counter
    # and training moved the weights (a resume that trained nothing could not pass the equality above)
    first = load_checkpoint(tmp_path / "reference" / "last.ckpt")
    assert first["global_step"] == 8
    from tar_lightning.models import tiny_llama

    start = tiny_llama()[0].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in reference["weights"].items())


REDTEAM_KILLS = [
    # (evaluation index in that child, run files finished before, after); d04 evaluates 11 times per run, d05 4
    ("5", [], []),  # mid-attack of d04 seed 0
    ("15", [], ["d04__seed0"]),  # d04 seed 0 completes, dies mid-attack of d04 seed 1
    ("4", ["d04__seed0"], ["d04__seed0"]),  # resumes d04 seed 1 from its start, dies mid-attack again
    ("13", ["d04__seed0"], ["d04__seed0", "d04__seed1"]),  # dies mid-attack of d05 seed 0
]


@pytest.mark.slow  # 5 red-team processes, 4 of them killed
def test_red_team_killed_mid_attack_reruns_to_identical_results(tmp_path):
    run_driver("redteam.py", "--work", str(tmp_path), "--kills", ",".join(k for k, _, _ in REDTEAM_KILLS))
    log = json.loads((tmp_path / "log.json").read_text())
    assert log[0] == {"run": "reference", "status": "exit:0"}
    for entry, (spec, before, after) in zip(log[1:-1], REDTEAM_KILLS, strict=True):
        assert entry["run"] == f"kill:{spec}"
        assert entry["status"] == "signal:SIGKILL", entry
        assert entry["finished_before"] == before and entry["finished_after"] == after, entry
    assert log[-1]["status"] == "exit:0"
    # the final rerun evaluated only the two runs left: d05 × 2 seeds, 4 evaluations each
    assert (tmp_path / "interrupted" / "evaluations.txt").read_text() == "8"
    assert (tmp_path / "reference" / "evaluations.txt").read_text() == "30"

    ref = json.loads((tmp_path / "reference" / "results.json").read_text())
    got = json.loads((tmp_path / "interrupted" / "results.json").read_text())
    assert len(ref["runs"]) == len(got["runs"]) == 4
    for a, b in zip(ref["runs"], got["runs"], strict=True):
        for key in ("attack", "seed", "run_seed", "config_hash", "config", "before", "after", "trajectory",
                    "train_loss", "lr", "switch_point", "steps"):
            assert a[key] == b[key], (a["attack"], a["seed"], key)
    assert ref["aggregate"] == got["aggregate"]
    assert not list((tmp_path / "interrupted" / "runs").glob("*.tmp"))
    # results hold scores and configurations only: none of the attack's (hazardous-domain) text is written
    from tar_lightning.data.sources import load_records

    written = "".join(p.read_text() for p in (tmp_path / "interrupted").rglob("*.json"))
    texts = [r["text"] for r in load_records({"path": "synthetic:forget", "synthetic": {"n": 320, "seed": 1}})]
    assert len(texts) == 320 and not [t for t in texts if t[:40] in written]
