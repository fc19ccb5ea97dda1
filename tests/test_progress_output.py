"""Progress of ``evaluate`` and the red team: true totals, and no escape codes when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from tar_lightning.evaluation.progress import PlainProgress, progress
from tar_lightning.models import export_pretrained, tiny_llama

QUESTIONS = [
    {"question": f"Which letter is number {i}?", "choices": ["alpha", "beta gamma", "delta", "epsilon zeta eta"],
     "answer": i % 4}
    for i in range(6)
]


def _cli(args: list[str], stderr_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``tar-lightning ARGS`` in a fresh process, stderr written to a file (not a terminal)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TAR_LIGHTNING_DATA", None)
    with open(stderr_path, "w", encoding="utf-8") as err:
        return subprocess.run([sys.executable, "-m", "tar_lightning.cli", *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=None, check=False)


def _no_escape_codes(text: str) -> None:
    assert "\r" not in text, "carriage return in non-terminal output"
    assert "\x1b" not in text, "escape code in non-terminal output"


def test_evaluate_progress_in_a_log_file_has_true_totals_and_no_escape_codes(tmp_path):
    root = tmp_path / "data"
    (root / "wmdp").mkdir(parents=True)
    (root / "wmdp" / "wmdp-bio-questions.json").write_text(json.dumps(QUESTIONS), encoding="utf-8")
    model = export_pretrained(*tiny_llama(), tmp_path / "model")  # loaded by transformers, whose bars are quiet
    out, err = tmp_path / "results.json", tmp_path / "stderr.log"
    run = _cli(["evaluate", "--model", str(model), "--tasks", "wmdp_bio", "--data_root", str(root),
                "--variants", "letter,cloze", "--batch_size", "4", "--out", str(out)], err, tmp_path)
    text = err.read_text(encoding="utf-8")
    assert run.returncode == 0, text
    _no_escape_codes(text)

    results = json.loads(out.read_text())["tasks"]["wmdp_bio"]["results"]
    # letter: one sequence per question (the choices differ in the last token only) -> ceil(6 / 4) batches
    assert results["letter"]["forward_passes"] == math.ceil(len(QUESTIONS) / 4) == 2
    for setting, res in results.items():
        total = res["forward_passes"]
        lines = [line for line in text.splitlines() if line.startswith(f"wmdp_bio {setting}: ")]
        counts = [re.match(rf"wmdp_bio {re.escape(setting)}: (\d+)/(\d+) batches", line) for line in lines]
        assert all(counts), lines
        assert {int(m.group(2)) for m in counts} == {total}, (setting, lines)  # the true total on every line
        assert int(counts[0].group(1)) == 0 and int(counts[-1].group(1)) == total, lines  # start and finish
        assert f"wmdp_bio {setting}: {total}/{total} batches (100%)" in text
    assert results["cloze"]["forward_passes"] > results["letter"]["forward_passes"]  # one sequence per choice


def test_redteam_progress_in_a_log_file_has_no_escape_codes(tmp_path):
    err, out = tmp_path / "stderr.log", tmp_path / "rt"
    run = _cli(["redteam", "--model", "tiny", "--suite", "durability", "--scale", "0.05", "--seeds", "1",
                "--attacks", "d04,d05", "--max_steps", "2", "--out", str(out)], err, tmp_path)
    text = err.read_text(encoding="utf-8")
    assert run.returncode == 0, text
    _no_escape_codes(text)
    assert "red team durability: 0/2 runs (0%)" in text  # the outer count, with its true total
    assert "red team durability: 2/2 runs (100%)" in text
    for attack in ("d04", "d05"):  # the nested per-attack counts, as plain lines, totals as run
        steps = json.loads((out / "runs" / f"{attack}__seed0.json").read_text())["config"]["adversary"]["steps"]
        unit = "step" if steps == 1 else "steps"
        assert re.search(rf"^{attack} seed 0: 0/{steps} {unit} \(0%\)$", text, re.M), text
        assert re.search(rf"^{attack} seed 0: {steps}/{steps} {unit} \(100%\) ", text, re.M), text


def test_plain_progress_lines_per_tenth_and_for_an_unknown_total():
    buf = io.StringIO()
    assert list(progress(range(20), total=20, desc="job", unit="batch", file=buf)) == list(range(20))
    done = [int(m.group(1)) for m in re.finditer(r"^job: (\d+)/20 batches \((\d+)%\)", buf.getvalue(), re.M)]
    assert done == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # the start, every 10 %, the end

    buf = io.StringIO()
    bar = PlainProgress(total=None, desc="search", unit="step", file=buf)
    for _ in range(11):
        bar.update(1)
    bar.close()
    bar.close()  # once only
    lines = buf.getvalue().splitlines()
    assert [int(line.split()[1]) for line in lines] == [0, 1, 2, 4, 8, 11]
    assert [" ".join(line.split()[2:3]) for line in lines[:3]] == ["steps", "step", "steps"]  # "1 step"
    buf = io.StringIO()
    list(progress([0], total=1, desc="one", unit="batch", file=buf))
    assert buf.getvalue().splitlines()[-1].startswith("one: 1/1 batch (100%) ")
    assert progress(total=3, desc="off", enabled=False) is None
    assert progress([1, 2], total=2, enabled=False) == [1, 2]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm import tqdm

    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as tty:
        bar = progress(total=3, desc="tty", unit="batch", file=tty)
        assert isinstance(bar, tqdm)
        bar.update(3)
        bar.close()
    os.close(primary)
