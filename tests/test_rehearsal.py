"""The paper run's whole life, rehearsed on CPU through the ``tar-lightning`` command, as a user drives it.

The Bio paper recipe (recipes/tar/bio_llama3_8b.yaml) with a tiny model, under the real FSDP2 launch overlay
(recipes/launch/fsdp2_8gpu.yaml, hardware keys changed for 2 gloo CPU processes), with validation (sanity check,
``data.val_streams``, MCQValidation), RetainLossMonitor, TamperProbe, SlurmRequeue and periodic sharded
checkpoints with rotation. The derived recipes are written at test time from the real ones
(tests/rehearsal/rehearsal_recipes.py says what changes and why).

The life: an uninterrupted reference run; then the same run SIGKILLed (both ranks, no cleanup) inside the
sharded save of ``last.ckpt`` at step 4, resumed with ``--ckpt_path last``, SIGKILLed again inside the save of
``last.ckpt`` at step 6, resumed from the explicit periodic checkpoint folder of step 6, run to the end. Both
final sharded checkpoints are exported with ``tar-lightning export``, loaded with
``transformers.AutoModelForCausalLM`` and compared tensor by tensor: they must be bit-identical (tolerance 0:
same configs, same data order and RNG on resume, deterministic CPU kernels); the export is red-teamed with
``tar-lightning redteam``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import launch_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "rehearsal"))
from rehearsal_recipes import CHECKPOINT_EVERY, MAX_STEPS, derive_configs  # noqa: E402

KILLER = REPO / "tests" / "rehearsal" / "cli_killed_in_save.py"
CONSOLE = Path(sys.executable).parent / "tar-lightning"


def run(cmd: list[str], log: Path, **env_extra: str) -> int:
    """One command in its own session (a kill of its process group cannot reach pytest); output to ``log``."""
    env = launch_env(drop_slurm=True, TOKENIZERS_PARALLELISM="false", **env_extra)
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        rc = proc.wait()
    # a killed job may leave its rank-1 process: nothing of it may outlive the test
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def tail(log: Path, n: int = 6000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-n:]


def train_steps(root: Path) -> list[list[int]]:
    """Per logged run (logs/version_*), the outer steps it trained, from its metrics.csv."""
    runs = []
    for version in sorted((root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        runs.append(sorted({int(r["step"]) for r in rows if r.get("train/retain_loss")}))
    return runs


def retain_losses(root: Path) -> list[dict[int, str]]:
    """Per logged run, the logged outer retain loss by step (as written: exact comparison)."""
    runs = []
    for version in sorted((root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv", encoding="utf-8") as fh:
            runs.append({int(r["step"]): r["train/retain_loss"] for r in csv.DictReader(fh) if r.get("train/retain_loss")})
    return runs


def diverged_steps(reference: Path, interrupted: Path) -> list[tuple[int, int]]:
    """(run, step) of the interrupted run's logged retain losses that differ from the reference run's."""
    (expected,) = retain_losses(reference)
    return [(run_index, step) for run_index, losses in enumerate(retain_losses(interrupted))
            for step, loss in losses.items() if loss != expected[step]]


def metric_names(root: Path) -> set[str]:
    names = set()
    for metrics in (root / "logs").glob("version_*/metrics.csv"):
        with open(metrics, encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                names |= {k for k, v in row.items() if v not in ("", None)}
    return names


def checkpoint_names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir() if not p.name.startswith("."))


def periodic(root: Path) -> dict[int, Path]:
    """The periodic checkpoints (``epoch=E-step=S.ckpt``) in the run folder, by step."""
    out = {}
    for path in (root / "checkpoints").glob("epoch=*-step=*.ckpt"):
        out[int(re.search(r"step=(\d+)", path.name).group(1))] = path
    return out


@pytest.mark.slow  # 4 two-process fits, 2 exports, 1 red-team run
def test_paper_run_life_rehearsed_on_cpu(tmp_path):
    start = time.monotonic()
    configs = derive_configs(tmp_path / "recipes")
    fit_args = ["fit", *[a for c in configs for a in ("--config", str(c))]]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    events = tmp_path / "kills.jsonl"

    # 1. the uninterrupted reference run
    log = tmp_path / "reference.log"
    assert run([str(CONSOLE), *fit_args, "--trainer.default_root_dir", str(reference)], log) == 0, tail(log)
    assert train_steps(reference) == [list(range(MAX_STEPS))]
    names = metric_names(reference)
    for metric in ("val/tr_heldout/loss", "val/mcq/forget", "val/mcq/retain", "retain_monitor/ratio"):
        # validation (val_streams), MCQValidation and RetainLossMonitor ran; TamperProbe: checked at the end
        assert any(n.startswith(metric) for n in names), (metric, sorted(names))
    # rotation: one periodic checkpoint kept, plus last.ckpt; both sharded folders
    assert list(periodic(reference)) == [MAX_STEPS], checkpoint_names(reference)
    assert len(checkpoint_names(reference)) == 2, checkpoint_names(reference)
    assert (reference / "checkpoints" / "last.ckpt").is_dir()

    # 2. killed inside the sharded save of last.ckpt at step 4
    log = tmp_path / "killed_1.log"
    rc = run([sys.executable, str(KILLER), *fit_args, "--trainer.default_root_dir", str(interrupted)], log,
             REHEARSAL_KILL_STEP="4", REHEARSAL_EVENTS=str(events))
    assert rc == -signal.SIGKILL, (rc, tail(log))
    kill = json.loads(events.read_text().splitlines()[-1])
    assert kill["killed_at_step"] == 4 and "last" in Path(kill["folder"]).name, kill
    assert any(e.endswith(".distcp") for e in kill["entries"]), kill  # shards written, metadata not yet
    # the resume point is the previous last.ckpt (step 2), complete: its non-tensor part says step 2
    meta = torch.load(interrupted / "checkpoints" / "last.ckpt" / "meta.pt", map_location="cpu", weights_only=True)
    assert meta["global_step"] == CHECKPOINT_EVERY, meta["global_step"]

    # 3. resumed with --ckpt_path last (the previous, complete last.ckpt: step 2), killed in last.ckpt's save at 6
    log = tmp_path / "killed_2.log"
    rc = run([sys.executable, str(KILLER), *fit_args, "--trainer.default_root_dir", str(interrupted),
              "--ckpt_path", "last"], log, REHEARSAL_KILL_STEP="6", REHEARSAL_EVENTS=str(events))
    assert rc == -signal.SIGKILL, (rc, tail(log))
    kill = json.loads(events.read_text().splitlines()[-1])
    assert kill["killed_at_step"] == 6 and "last" in Path(kill["folder"]).name, kill
    assert train_steps(interrupted)[1][0] == CHECKPOINT_EVERY, train_steps(interrupted)  # resumed at step 2
    # every outer step the resumed run logged computed the uninterrupted run's retain loss, to the last digit
    assert not diverged_steps(reference, interrupted), diverged_steps(reference, interrupted)
    # step 2's periodic checkpoint was rotated away by the first run; step 4's, written by that run just before
    # it died, is unknown to the resumed run's ModelCheckpoint (restored from step 2) and stays
    assert 6 in periodic(interrupted) and 2 not in periodic(interrupted), checkpoint_names(interrupted)

    # 4. resumed from the explicit periodic checkpoint folder of step 6, to the end
    log = tmp_path / "resumed.log"
    explicit = periodic(interrupted)[6]
    rc = run([str(CONSOLE), *fit_args, "--trainer.default_root_dir", str(interrupted), "--ckpt_path", str(explicit)],
             log)
    assert rc == 0, tail(log)
    steps = train_steps(interrupted)
    assert len(steps) == 3 and steps[2] == [6, 7], steps
    assert not diverged_steps(reference, interrupted), diverged_steps(reference, interrupted)
    # (Lightning never removes the checkpoint a run resumed from: step 6's stays)
    assert max(periodic(interrupted)) == MAX_STEPS, checkpoint_names(interrupted)
    # what the killed saves left half-written is gone (an 8B run's would be ~100 GB)
    hidden = [p.name for p in (interrupted / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not hidden, hidden

    # 5. export both final sharded checkpoints, load them with transformers, compare tensor by tensor
    exports = {}
    finals = {"reference": reference / "checkpoints" / "last.ckpt", "interrupted": periodic(interrupted)[MAX_STEPS]}
    for name, folder in finals.items():
        log = tmp_path / f"export_{name}.log"
        exports[name] = tmp_path / f"export_{name}"
        rc = run([str(CONSOLE), "export", "--ckpt", str(folder), "--out", str(exports[name])], log)
        assert rc == 0, tail(log)
    from transformers import AutoModelForCausalLM

    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for name, path in exports.items()}
    ref_state, got_state = models["reference"].state_dict(), models["interrupted"].state_dict()
    assert ref_state.keys() == got_state.keys()
    # tolerance 0: the resumed runs see the same data, draws and kernels; a validation (here after step 6, where the
    # explicit resume starts) must leave the training point bit-untouched for this to hold with schedule-free AdamW
    different = [k for k in ref_state if not torch.equal(ref_state[k], got_state[k])]
    assert not different, (f"resumed weights differ from the uninterrupted run's in {len(different)} tensors, e.g. "
                           f"{different[:3]}; (run, step) whose retain loss differs: "
                           f"{diverged_steps(reference, interrupted)}")
    # training moved the weights (a run that trained nothing could not fail the comparison above)
    from tar_lightning.models import tiny_llama

    initial = tiny_llama()[0].state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in ref_state.items() if k in initial)
    ids = torch.randint(3, models["interrupted"].config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = models["interrupted"](input_ids=ids).logits
    assert logits.shape == (2, 16, models["interrupted"].config.vocab_size) and torch.isfinite(logits).all()

    # 6. red-team the export: one short attack of the durability suite
    log = tmp_path / "redteam.log"
    out = tmp_path / "redteam"
    rc = run([str(CONSOLE), "redteam", "--model", str(exports["interrupted"]), "--suite", "durability",
              "--attacks", "d05", "--seeds", "1", "--max_steps", "2", "--threads", "1", "--progress", "false",
              "--out", str(out)], log)
    assert rc == 0, tail(log)
    results = json.loads((out / "results.json").read_text())
    assert [r["attack"] for r in results["runs"]] == ["d05"]
    assert results["runs"][0]["before"]["forget_loss"] != results["runs"][0]["after"]["forget_loss"]

    wall = time.monotonic() - start
    print(f"\nrehearsal wall time: {wall:.1f} s")
    # TamperProbe attacked the sharded weights in place (restored bit-exactly) during both runs
    for root in (reference, interrupted):
        assert "probe/forget_loss" in metric_names(root), sorted(metric_names(root))
