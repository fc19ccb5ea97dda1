"""The ``tar-lightning`` command's surface: ``--help`` and ``--version``, the subcommands it refuses (``test``,
``predict``) and ``validate`` without validation data, overlays that merge mappings as dotted overrides do, the
TensorBoard and W&B logger overlays (a missing package is one line naming the extra; installed, they write their
runs), and a progress bar that counts optimizer steps.

A missing logger package is simulated honestly: the CLI runs in a fresh interpreter in which importing that
package fails (``sys.modules[name] = None``), whatever is installed; nothing of ours is replaced.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_recipes import (  # noqa: F401  (_isolate_global_state: autouse fixture, keeps CLI seeding local)
    REPO,
    _isolate_global_state,
    _ParseOnlyCLI,
)

import tar_lightning
from tar_lightning.cli import TARCLI, main

TINY_TAR = REPO / "recipes" / "tiny" / "tar.yaml"
SUBCOMMANDS = ("fit", "validate", "demo", "redteam", "evaluate", "export", "report")


def _outputs(root: Path, steps: int = 1) -> list[str]:
    """Overrides that keep a tiny run's files under ``root`` and its length at ``steps`` outer steps."""
    return ["--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps)]


def _cli(*args: str, block: tuple[str, ...] = (), cwd: Path = REPO, env: dict | None = None):
    """``tar-lightning ARGS`` in a fresh interpreter in which the modules ``block`` do not import."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(block)!r})); "
            "from tar_lightning.cli import main; sys.exit(main())")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=900)


# ------------------------------------------------------------------------------------------ --help, --version
def test_version_prints_the_library_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tar-lightning {tar_lightning.__version__}"


def test_help_lists_every_subcommand_with_a_line_each(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in SUBCOMMANDS:
        described = [line for line in lines if line.split()[:1] == [name]]
        assert len(described) == 1 and len(described[0].split()) > 3, f"{name!r} not listed with a description"
    refused = [line for line in lines if line.startswith("not offered:")]
    assert len(refused) == 1 and "test" in refused[0] and "predict" in refused[0]
    assert "--version" in out


def test_no_subcommand_prints_the_help_and_fails(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in SUBCOMMANDS)


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_test_and_predict_are_refused_in_one_line(subcommand, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([subcommand, "--config", str(TINY_TAR), *_outputs(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{subcommand!r} is not offered" in err
    assert "tar-lightning " in err.split("not offered", 1)[1]  # says what to use instead
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ validate
def test_validate_without_validation_data_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--config", str(TINY_TAR), *_outputs(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "val_streams" in err and "nothing to validate" in err


def _val_overlay(tmp_path: Path) -> Path:
    overlay = tmp_path / "val.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"init_args": {"val_streams": {"heldout": {
        "path": "synthetic:forget", "synthetic": {"n": 40, "seed": 1}, "limit": 8}}}}}), encoding="utf-8")
    return overlay


def test_validate_that_runs_no_batch_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(TINY_TAR), "--config", str(_val_overlay(tmp_path)),
            *_outputs(tmp_path / "run"), "--trainer.limit_val_batches", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no validation batch" in err


def test_validate_with_validation_data_logs_its_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(TINY_TAR), "--config", str(_val_overlay(tmp_path)),
            *_outputs(tmp_path / "run")]
    cli = TARCLI(args=args)
    assert set(cli.trainer.callback_metrics) == {"val/heldout/loss", "val/heldout/entropy"}


# ------------------------------------------------------------------------------------------ overlays merge
def _overlay(tmp_path: Path, data: dict, name: str = "overlay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _streams(*args: str) -> dict:
    return _ParseOnlyCLI(args=list(args), run=False).config.data.init_args.as_dict()["streams"]


def test_overlay_setting_one_stream_key_merges_like_the_dotted_override(tmp_path):
    base = _streams("--config", str(TINY_TAR))
    overlay = _overlay(tmp_path, {"data": {"init_args": {"streams": {"forget": {"path": "synthetic:retain"}}}}})
    merged = _streams("--config", str(TINY_TAR), "--config", str(overlay))
    dotted = _streams("--config", str(TINY_TAR), "--data.init_args.streams.forget.path", "synthetic:retain")
    assert list(merged) == list(base) == ["retain", "forget", "tr", "retain_domain"]
    assert merged == dotted
    assert merged["forget"] == {**base["forget"], "path": "synthetic:retain"}
    assert {k: v for k, v in merged.items() if k != "forget"} == {k: v for k, v in base.items() if k != "forget"}


def test_overlay_mappings_merge_at_every_depth_and_add_keys(tmp_path):
    base = _streams("--config", str(TINY_TAR))
    overlay = _overlay(tmp_path, {"data": {"init_args": {"streams": {
        "forget": {"synthetic": {"n": 100}},  # a mapping inside a stream: seed stays
        "extra": {"path": "synthetic:retain"},  # a new key is added after the others
    }}}})
    merged = _streams("--config", str(TINY_TAR), "--config", str(overlay))
    assert list(merged) == [*base, "extra"]
    assert merged["forget"]["synthetic"] == {"n": 100, "seed": base["forget"]["synthetic"]["seed"]}
    assert merged["extra"]["path"] == "synthetic:retain"
    # later overlays win over earlier ones, key by key
    second = _overlay(tmp_path, {"data": {"init_args": {"streams": {"forget": {"synthetic": {"seed": 7}}}}}}, "b.yaml")
    merged = _streams("--config", str(TINY_TAR), "--config", str(overlay), "--config", str(second))
    assert merged["forget"]["synthetic"] == {"n": 100, "seed": 7} and "extra" in merged


def test_fit_with_an_overlay_setting_one_stream_path_runs(tmp_path, monkeypatch):
    """The symptom: the overlay used to replace ``streams`` and fit failed blaming the missing streams."""
    monkeypatch.chdir(tmp_path)
    overlay = _overlay(tmp_path, {"data": {"init_args": {"streams": {"forget": {"path": "synthetic:retain"}}}}})
    cli = TARCLI(args=["fit", "--config", str(TINY_TAR), "--config", str(overlay), *_outputs(tmp_path / "run")])
    streams = cli.datamodule.streams
    assert sorted(streams) == ["forget", "retain", "retain_domain", "tr"]
    assert streams["forget"].path == "synthetic:retain" and streams["forget"].select == "0:80%"
    assert cli.trainer.global_step == 1


# ------------------------------------------------------------------------------------------ loggers
@pytest.mark.parametrize("logger, block", [("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))])
def test_missing_logger_package_is_one_line_naming_the_extra(logger, block, tmp_path):
    proc = _cli("fit", "--config", str(TINY_TAR), "--config", str(REPO / "callbacks" / f"{logger}.yaml"),
                *_outputs(tmp_path / "run"), block=block, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # one line, no traceback (Lightning's own "Seed set to 0" log line comes first)
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Seed set to")]
    assert len(err) == 1, proc.stderr[-3000:]
    assert f"pip install 'tar_lightning[{logger}]'" in err[0] and err[0].startswith("tar-lightning: error:")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was built


def test_tensorboard_overlay_writes_event_files(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    args = ["fit", "--config", str(TINY_TAR), "--config", str(REPO / "callbacks" / "tensorboard.yaml"),
            *_outputs(root, steps=2)]
    assert main(args) == 0
    (events,) = (root / "tensorboard").glob("version_0/events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    assert [e.step for e in scalars.Scalars("train/retain_loss")] == [0, 1]
    assert "hp_metric" not in scalars.Tags()["scalars"]


@pytest.mark.slow
def test_wandb_overlay_writes_an_offline_run(tmp_path):
    import os

    root = tmp_path / "run"
    env = {**os.environ, "WANDB_SILENT": "true"}
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())  # nothing written to the home folder
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    proc = _cli("fit", "--config", str(TINY_TAR), "--config", str(REPO / "callbacks" / "wandb.yaml"),
                *_outputs(root, steps=2), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"train/retain_loss" in run_file.read_bytes()


# ------------------------------------------------------------------------------------------ progress bar
def _train_bar(trainer) -> tuple[str, float, float]:
    """(description, completed, total) of the training bar, rich or tqdm."""
    bar = trainer.progress_bar_callback
    if getattr(bar, "progress", None) is not None:
        (task,) = [t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id]
        return task.description, task.completed, task.total
    tqdm_bar = bar.train_progress_bar
    return tqdm_bar.desc, tqdm_bar.n, tqdm_bar.total


@pytest.mark.parametrize("bar", [None, "tar_lightning.cli.TQDMStepProgressBar"], ids=["default", "tqdm"])
def test_progress_bar_counts_optimizer_steps_of_a_max_steps_run(bar, tmp_path, monkeypatch):
    """``max_steps`` 3 over data epochs of 2 steps: the bar ends at 3/3 steps, not "Epoch 1/-2 ... 1/1". The
    default bar is rich where rich is installed (as Lightning's); the tqdm one is what it is otherwise."""
    monkeypatch.chdir(tmp_path)
    chosen = ["--trainer.callbacks+", bar] if bar else []
    cli = TARCLI(args=["fit", "--config", str(TINY_TAR), *_outputs(tmp_path / "run", steps=3),
                       "--data.init_args.steps_per_epoch", "2", *chosen])
    assert cli.trainer.current_epoch >= 1 and cli.trainer.max_epochs == -1  # more than one data epoch ran
    description, completed, total = _train_bar(cli.trainer)
    assert (completed, total) == (3, 3)
    assert description.strip().rstrip(":") == "Steps"  # tqdm adds ": " to its description
