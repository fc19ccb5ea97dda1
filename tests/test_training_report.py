"""``tar-lightning report``: the training report of a real tiny TAR run, checked against its metrics.csv read here
with the csv module; the merge of a resumed run's logs; TensorBoard event files; the refusals."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tar_lightning.cli import main
from tar_lightning.errors import ConfigError, DataError
from tar_lightning.evaluation.training_report import PLOTS, read_training_log, training_report

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "tar.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def csv_columns(path: Path) -> dict[str, dict[int, float]]:
    """metrics.csv as column -> step -> value (non-empty cells), read independently of the code under test."""
    out: dict[str, dict[int, float]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for name, text in row.items():
                if name not in ("step", "epoch") and text:
                    out.setdefault(name, {})[int(row["step"])] = float(text)
    return out


@pytest.fixture(scope="module")
def tar_run(tmp_path_factory) -> Path:
    """A 3-outer-step tiny TAR fit (K = 4, TR points k = 1, 3) with the persistent pool on, logged by the recipe's
    CSVLogger under <root>/logs/version_0/metrics.csv."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tar_run")
    rc = main(["fit", "--config", str(RECIPE), "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", "--model.init_args.config.persistent_pool", "2"])
    assert rc == 0
    assert (root / "logs" / "version_0" / "metrics.csv").is_file()
    return root


def test_report_of_a_real_tar_fit_matches_its_metrics_csv(tar_run, capsys):
    assert main(["report", "--run", str(tar_run)]) == 0
    out = tar_run / "report"
    for filename in PLOTS.values():  # the run logs every plotted series, the pool included
        data = (out / filename).read_bytes()
        assert data[:8] == PNG_MAGIC, filename
        assert len(data) > 1000, filename

    cols = csv_columns(tar_run / "logs" / "version_0" / "metrics.csv")
    steps = [0, 1, 2]
    report = training_report(tar_run, tar_run / "report2", plots=False)
    assert report.adv_k == [0, 1, 2, 3] and report.adv_steps == steps
    expected = np.array([[cols[f"train/adv_loss/k{k:03d}"][s] for s in steps] for k in range(4)])
    assert np.array_equal(report.adv_loss, expected)
    assert report.tr_points == [1, 3] and report.tr_steps == steps and report.diag_name == "entropy"
    assert np.array_equal(report.tr_loss, [[cols[f"train/tr_loss/k{k:03d}"][s] for s in steps] for k in (1, 3)])
    assert np.array_equal(report.diag, [[cols[f"train/entropy/k{k:03d}"][s] for s in steps] for k in (1, 3)])
    # the max-entropy TR loss is minus the entropy, and the first/last columns are logged twice
    assert np.allclose(report.tr_loss, -report.diag)
    assert np.array_equal(report.adv_loss[0], [cols["train/adv_loss_first"][s] for s in steps])
    assert np.array_equal(report.adv_loss[-1], [cols["train/adv_loss_last"][s] for s in steps])
    assert report.series["train/pool_size"] == (steps, [cols["train/pool_size"][s] for s in steps])

    # early vs late: 10% of 3 steps rounds up to one step each
    first, last = report.windows
    assert first["steps"] == [0] and last["steps"] == [2]
    assert first["adv_loss_first_k"] == cols["train/adv_loss/k000"][0]
    assert last["drop"] == pytest.approx(cols["train/adv_loss/k000"][2] - cols["train/adv_loss/k003"][2])

    md = (out / "report.md").read_text()
    series = [c for c in cols if c.startswith(("train/adv_loss", "train/tr_loss", "train/entropy",
                                                "train/retain", "train/pool"))]
    assert len(series) >= 17
    for name in series:
        assert f"| `{name}` | 3 | 0 | {cols[name][0]:.4f} | 2 | {cols[name][2]:.4f} |" in md, name
    for filename in PLOTS.values():
        assert f"]({filename})" in md
    assert "Not in the log" not in md  # nothing missing in this run


def test_existing_out_is_refused_without_overwrite(tar_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["report", "--run", str(tar_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    (out / PLOTS["pool"]).write_bytes(b"old")
    assert main(["report", "--run", str(tar_run), "--out", str(out), "--overwrite", "--plots", "false"]) == 0
    # a previous report's plot this report does not write is removed; other files are left alone
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.md"]
    with pytest.raises(ConfigError, match="already exists"):
        training_report(tar_run, out)


def test_a_folder_without_tar_metrics_is_one_line_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    log_dir = tmp_path / "rm" / "logs" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.25\n")  # a non-TAR run
    for run in (empty, tmp_path / "rm"):
        assert main(["report", "--run", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert str(run) in err and "train/adv_loss/kNNN" in err and "metrics.csv" in err
        assert not (run / "report").exists()
    assert main(["report", "--run", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def write_csv(path: Path, header: list[str], rows: list[list], mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.utime(path, (mtime, mtime))


def test_resumed_run_logs_merge_and_sparse_per_k_steps_are_nan(tmp_path):
    header = ["epoch", "step", "train/adv_loss/k000", "train/adv_loss/k001", "train/adv_loss_first",
              "train/adv_loss_last", "train/retain_loss"]
    # version_0: steps 0-3, per-k losses on the logging steps 1 and 3 only (log_every_n_steps: 2);
    # Lightning writes a second, partial row for a step when more was logged later
    write_csv(tmp_path / "logs" / "version_0" / "metrics.csv", header, [
        [0, 0, "", "", 5.0, 4.0, 1.0],
        [0, 1, 5.1, 4.1, 5.1, 4.1, 1.1],
        [0, 1, "", "", "", "", 1.15],
        [0, 2, "", "", 5.2, 4.2, 1.2],
        [0, 3, 5.3, 4.3, 5.3, 4.3, 1.3],
    ], mtime=1_000_000)
    # version_1: resumed from step 2 (its steps replace version_0's from 2 on)
    write_csv(tmp_path / "logs" / "version_1" / "metrics.csv", header, [
        [0, 2, "", "", 6.2, 3.2, 2.2],
        [0, 3, 6.3, 3.3, 6.3, 3.3, 2.3],
        [0, 4, "", "", 6.4, 3.4, 2.4],
    ], mtime=2_000_000)
    log = read_training_log(tmp_path)
    assert [p.parent.name for p in log.sources] == ["version_0", "version_1"]
    assert log.series("train/retain_loss") == ([0, 1, 2, 3, 4], [1.0, 1.15, 2.2, 2.3, 2.4])
    report = training_report(tmp_path, plots=False)
    assert report.adv_steps == [1, 3]
    assert np.array_equal(report.adv_loss, [[5.1, 6.3], [4.1, 3.3]])
    # 10% of 5 steps -> 1 step: step 0 (5.0 -> 4.0) and step 4 (6.4 -> 3.4), from the every-step scalars
    first, last = report.windows
    assert (first["steps"], first["drop"]) == ([0], pytest.approx(1.0))
    assert (last["steps"], last["drop"]) == ([4], pytest.approx(3.0))
    assert any("persistent pool" in m for m in report.missing)
    assert any("TR loss per evaluation point" in m for m in report.missing)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| `train/retain_loss` | 5 | 0 | 1.0000 | 4 | 2.4000 |" in md


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    values = {f"train/adv_loss/k{k:03d}": {s: 3.0 - 0.25 * k + 0.125 * s for s in range(4)} for k in range(3)}
    values["train/retain_loss"] = {s: 1.0 + s for s in range(4)}
    writer = SummaryWriter(str(tmp_path / "tensorboard" / "version_0"))
    for s in range(4):
        for name, points in values.items():
            writer.add_scalar(name, points[s], s)
    writer.close()
    report = training_report(tmp_path, plots=False)
    assert report.adv_k == [0, 1, 2] and report.adv_steps == [0, 1, 2, 3]
    assert np.array_equal(report.adv_loss, [[values[f"train/adv_loss/k{k:03d}"][s] for s in range(4)]
                                            for k in range(3)])
    assert report.series["train/retain_loss"] == ([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    assert math.isclose(report.windows[1]["drop"], 0.5)  # heatmap rows k=0 and k=2 (no scalar first/last)


def test_unreadable_csv_value_names_file_line_and_column(tmp_path):
    write_csv(tmp_path / "metrics.csv", ["step", "train/adv_loss_first"], [[0, "oops"]], mtime=1_000_000)
    with pytest.raises(DataError, match=r"metrics.csv' line 2: train/adv_loss_first = 'oops'"):
        read_training_log(tmp_path / "metrics.csv")


def test_report_is_a_listed_subcommand_with_its_options(capsys):
    assert main(["--help"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["report"]]
    assert main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{name}" in out for name in ("run", "out", "overwrite"))
    assert main(["report"]) == 2
    assert "missing --run" in capsys.readouterr().err
