"""Run folders: every recipe writes under ``trainer.default_root_dir``; a run never silently replaces another's.

- Every LightningCLI recipe (and overlay, parsed on the tiny TAR recipe) derives its checkpoint and log folders
  from ``trainer.default_root_dir``: parsed with another ``--trainer.default_root_dir``, every path moves.
- ``tar-lightning fit`` into a folder holding a previous run is refused (one line naming ``--ckpt_path last`` and
  ``--overwrite``); ``--ckpt_path last`` resumes it; ``--overwrite`` starts a new run there.
- ``tar-lightning redteam --out`` holding another model's results is refused unless ``--overwrite``; the same
  model resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_recipes import (  # noqa: F401  (_isolate_global_state: autouse fixture, keeps CLI seeding local)
    OVERLAY_BASE,
    REPO,
    _is_overlay,
    _isolate_global_state,
    _ParseOnlyCLI,
    _rel,
    _yaml_files,
)

from tar_lightning.cli import main
from tar_lightning.evaluation.redteam_cli import redteam_main


# ------------------------------------------------------------------------------------------ recipes
def _run_paths(trainer: dict) -> dict[str, str]:
    """Every folder a recipe's trainer writes to, by key (logger ``save_dir``, callbacks' ``dirpath``)."""
    paths = {}
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for i, logger in enumerate(loggers):
        if isinstance(logger, dict) and logger.get("init_args", {}).get("save_dir") is not None:
            paths[f"logger[{i}].save_dir"] = logger["init_args"]["save_dir"]
    for i, callback in enumerate(trainer.get("callbacks") or []):
        if isinstance(callback, dict) and callback.get("init_args", {}).get("dirpath") is not None:
            paths[f"callbacks[{i}].dirpath ({callback['class_path'].rsplit('.', 1)[-1]})"] = (
                callback["init_args"]["dirpath"])
    return paths


def _parsed_trainer(path: Path, *args: str) -> dict:
    configs = (OVERLAY_BASE, path) if _is_overlay(path) else (path,)
    argv = [a for c in configs for a in ("--config", str(c))] + list(args)
    return _ParseOnlyCLI(args=argv, run=False).config.as_dict()["trainer"]


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_every_recipe_derives_its_run_folders_from_default_root_dir(path, tmp_path):
    default = _parsed_trainer(path)
    paths = _run_paths(default)
    assert any("dirpath" in key for key in paths), f"{_rel(path)}: no checkpoint folder found"
    root = Path(default["default_root_dir"])
    for key, value in paths.items():
        assert Path(value).is_relative_to(root), f"{_rel(path)}: {key} = {value} is not under {root}"

    elsewhere = tmp_path / "elsewhere"
    moved = _parsed_trainer(path, "--trainer.default_root_dir", str(elsewhere))
    assert moved["default_root_dir"] == str(elsewhere)
    moved_paths = _run_paths(moved)
    assert moved_paths.keys() == paths.keys()
    for key, value in moved_paths.items():
        assert Path(value) == elsewhere / Path(paths[key]).relative_to(root), (
            f"{_rel(path)}: {key} = {value} did not follow --trainer.default_root_dir {elsewhere}")


# ------------------------------------------------------------------------------------------ fit
def _fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "recipes" / "tiny" / "tar.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", *extra]


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tar-lightning: error: "), lines
    return lines[0]


def test_second_fit_into_a_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    checkpoints = root / "checkpoints"
    assert main(_fit_args(root)) == 0
    last = checkpoints / "last.ckpt"
    first = last.read_bytes()
    assert _step(last) == 2
    versions = sorted(p.name for p in (root / "logs").iterdir())

    capsys.readouterr()
    assert main(_fit_args(root)) == 2
    line = _one_error_line(capsys)
    assert "--ckpt_path last" in line and "--overwrite" in line and str(last) in line, line
    assert last.read_bytes() == first  # nothing of the previous run was touched ...
    assert sorted(p.name for p in (root / "logs").iterdir()) == versions  # ... and nothing new was written

    # resume: continues from step 2 to step 3 (where the recipe also keeps a periodic checkpoint)
    assert main(_fit_args(root, "--trainer.max_steps", "3", "--ckpt_path", "last")) == 0
    assert _step(last) == 3
    periodic = sorted(p.name for p in checkpoints.iterdir() if p.name != "last.ckpt")
    assert len(periodic) == 1 and _step(checkpoints / periodic[0]) == 3

    # both at once is a contradiction
    capsys.readouterr()
    assert main(_fit_args(root, "--overwrite", "--ckpt_path", "last")) == 2
    assert "choose one" in _one_error_line(capsys)

    # overwrite: a new run from scratch; the previous run's checkpoints are gone
    assert main(_fit_args(root, "--overwrite")) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert _step(last) == 2


def test_config_yaml_of_a_previous_run_is_not_replaced(tmp_path, monkeypatch, capsys):
    """Without a logger, config.yaml goes to default_root_dir itself: another run's is never silently replaced."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    args = _fit_args(root, "--trainer.logger", "false", "--trainer.max_steps", "1")
    assert main(args) == 0
    config = root / "config.yaml"
    assert config.is_file()
    for entry in (root / "checkpoints").iterdir():  # only the config is left of that run
        entry.unlink()
    config.write_text(config.read_text() + "# the previous run's\n")
    before = config.read_text()
    capsys.readouterr()
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert str(config) in line and "--ckpt_path last" in line and "--overwrite" in line
    assert config.read_text() == before
    assert main([*args, "--overwrite"]) == 0
    assert config.read_text() != before


# ------------------------------------------------------------------------------------------ red team
def _redteam(out: Path, model: str, *extra: str) -> int:
    return redteam_main(["--model", model, "--suite", "durability", "--scale", "0.05", "--seeds", "1",
                         "--attacks", "d04,d05", "--max_steps", "2", "--out", str(out), "--progress", "false",
                         "--threads", "1", *extra])


def _models_in(out: Path) -> set[str]:
    runs = {json.loads(p.read_text())["model"]["source"] for p in (out / "runs").glob("*.json")}
    return runs | {json.loads((out / "results.json").read_text())["summary"]["model"]["source"]}


def test_redteam_refuses_an_out_dir_holding_another_models_results(tmp_path, capsys):
    out = tmp_path / "rt"
    assert _redteam(out, "tiny") == 0
    assert _models_in(out) == {"tiny"}
    capsys.readouterr()
    assert _redteam(out, "tiny") == 0  # the same model: resumed, nothing recomputed
    assert "(0 computed)" in capsys.readouterr().out
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".json", ".csv", ".md")}

    assert _redteam(out, "tiny-qwen2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0] and "--overwrite" in err[0] and "tiny-qwen2" in err[0], err
    assert {p: p.read_bytes() for p in files} == files  # untouched

    assert _redteam(out, "tiny-qwen2", "--overwrite") == 0
    assert _models_in(out) == {"tiny-qwen2"}
    assert "(2 computed)" in capsys.readouterr().out
