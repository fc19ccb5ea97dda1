"""A red-team suite file is data, not code: attack ids are plain names, callable metrics run only when trusted.

Both are checked through the real ``tar-lightning redteam`` command (a subprocess) and through the Python API.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tar_lightning import ConfigError
from tar_lightning.evaluation.redteam import build_evaluator, run_redteam
from tar_lightning.evaluation.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "tar-lightning")

# a metric module the suite below names; calling it leaves a marker file, so "it ran" is observable
METRIC_MODULE = '''
from pathlib import Path


def score(model, tokenizer, marker):
    Path(marker).write_text("ran")
    return 0.25
'''


def _suite(tmp_path: Path, old: str, new: str) -> Path:
    text = (REPO / "recipes" / "redteam" / "durability.yaml").read_text()
    assert old in text
    path = tmp_path / "suite.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _redteam(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([CLI, "redteam", "--model", "tiny", "--progress", "false", "--threads", "1", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


# ------------------------------------------------------------------------------------------ attack ids
@pytest.mark.parametrize("bad_id", ["../../x", "a/b", "/tmp/x", ".hidden", "x y", "d01\n"])
def test_attack_ids_that_are_not_plain_names_are_refused(tmp_path, bad_id):
    path = _suite(tmp_path, "  - id: d01\n", f"  - id: {json.dumps(bad_id)}\n")
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    msg = str(err.value)
    assert str(path) in msg and "attacks[0]" in msg and repr(bad_id) in msg and "plain name" in msg
    assert "letters, digits" in msg


def test_cli_refuses_an_attack_id_that_would_write_outside_out(tmp_path):
    path = _suite(tmp_path, "  - id: d05\n", "  - id: ../../escaped\n")
    out = tmp_path / "a" / "b" / "out"
    proc = _redteam(tmp_path, "--suite", str(path), "--attacks", "../../escaped", "--scale", "0.01",
                    "--seeds", "1", "--max_steps", "1", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'../../escaped'" in lines[0] and "plain name" in lines[0], proc.stderr
    assert not list(tmp_path.rglob("escaped*")) and not out.exists()


def test_shipped_suites_have_plain_ids():
    for name in ("durability", "weaponization", "refusal", "refusal_cpu", "wmdp_heldout", "heldout_attacks"):
        assert load_suite(name).ids  # loading validates every id


# ------------------------------------------------------------------------------------------ callable metrics
def _callable_suite(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "trust_probe_metric.py").write_text(METRIC_MODULE)
    marker = tmp_path / "metric_ran.txt"
    path = _suite(
        tmp_path,
        "    retain_loss: {kind: heldout_loss, data: retain_eval}",
        "    retain_loss: {kind: heldout_loss, data: retain_eval}\n"
        f"    probe: {{kind: callable, target: 'trust_probe_metric:score', options: {{marker: '{marker}'}}}}",
    )
    return path, marker


def test_cli_runs_a_callable_metric_only_with_the_trust_flag(tmp_path):
    path, marker = _callable_suite(tmp_path)
    out = tmp_path / "out"
    args = ["--suite", str(path), "--attacks", "d05", "--scale", "0.01", "--seeds", "1", "--max_steps", "1",
            "--out", str(out)]
    proc = _redteam(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--trust_callable_metrics" in lines[0] and "'probe'" in lines[0] and "trust_probe_metric:score" in lines[0]
    assert not marker.exists() and not out.exists()  # nothing imported, nothing written

    proc = _redteam(tmp_path, *args, "--trust_callable_metrics")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "ran"
    run = json.loads((out / "runs" / "d05__seed0.json").read_text())
    assert run["before"]["probe"] == 0.25 and run["after"]["probe"] == 0.25


def test_api_runs_a_callable_metric_only_when_trusted(tmp_path, monkeypatch):
    path, marker = _callable_suite(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = load_suite(path).select(["d05"]).with_seeds(1)
    with pytest.raises(ConfigError, match="trust_callable_metrics") as err:
        run_redteam("tiny", suite, out_dir=tmp_path / "out", scale=0.01, max_steps=1, progress=False)
    assert "trust_callable=True" in str(err.value)
    with pytest.raises(ConfigError, match="trust_callable=True"):
        build_evaluator(suite)
    assert not marker.exists() and not (tmp_path / "out").exists()

    result = run_redteam("tiny", suite, out_dir=tmp_path / "out", scale=0.01, max_steps=1, progress=False,
                         report=False, trust_callable=True)
    assert marker.read_text() == "ran"
    assert [(r["before"]["probe"], r["after"]["probe"]) for r in result.runs] == [(0.25, 0.25)]
