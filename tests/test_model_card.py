"""The model card of an export (README.md and tar_lightning.json) against the run that made the checkpoint."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import tar_lightning
from tar_lightning.cli import main
from tar_lightning.evaluation.redteam_cli import redteam_main
from tar_lightning.export import CARD_JSON, RUN_RECORD_KEY

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "tar.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny TAR run launched with the shipped recipe, an overlay file and a dotted override."""
    folder = tmp_path_factory.mktemp("card")
    out = folder / "run"
    overlay = folder / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"max_steps": 2}}), encoding="utf-8")
    args = ["fit", "--config", str(RECIPE), "--config", str(overlay), "--trainer.default_root_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(out), "--model.init_args.config.inner_steps", "2"]
    assert main(args) == 0
    return {"folder": folder, "out": out, "overlay": overlay, "args": args,
            "last": out / "checkpoints" / "last.ckpt"}


def _card(folder: Path) -> tuple[dict, str]:
    return json.loads((folder / CARD_JSON).read_text()), (folder / "README.md").read_text()


def _yaml_block(readme: str) -> dict:
    block = re.search(r"## Resolved configuration\n\n```yaml\n(.*?)\n```", readme, re.S)
    assert block, readme
    return yaml.safe_load(block.group(1))


def test_export_card_states_the_run_it_came_from(tiny_run, tmp_path, capsys):
    last = tiny_run["last"]
    hf = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", "--ckpt", str(last), "--out", str(hf)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # transformers' shard-writing bar is off outside a terminal
    facts, readme = _card(hf)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    (config_yaml,) = tiny_run["out"].rglob("config.yaml")  # what LightningCLI wrote for the run
    run_config = yaml.safe_load(config_yaml.read_text())

    assert facts["library"] == {"name": "tar_lightning", "version": tar_lightning.__version__}
    assert facts["checkpoint"]["path"] == str(last.resolve())
    assert facts["checkpoint"]["global_step"] == ckpt["global_step"] == 2
    assert facts["base_model"]["source"] == "tiny-llama"  # the recipe's model.init_args.model
    assert facts["module"] == "tar_lightning.TARModule"
    run = facts["run"]
    assert run["trained_with_library_version"] == tar_lightning.__version__
    assert run["launch_args"] == tiny_run["args"]
    assert [f["path"] for f in run["config_files"]] == [str(RECIPE), str(tiny_run["overlay"])]
    for f in run["config_files"]:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
    assert run["config_yaml"] == str(config_yaml.resolve())
    assert run["config"] == run_config
    assert run_config["trainer"]["max_steps"] == 2 and run_config["model"]["init_args"]["config"]["inner_steps"] == 2
    assert facts["redteam"] is None

    # the README states the same facts
    assert f"tar_lightning {tar_lightning.__version__}" in readme
    assert f"`{last.name}`, global step 2" in readme
    assert "Base model: `tiny-llama`" in readme
    assert "\n# hf: TARModule of `tiny-llama`\n" in readme  # the heading says what the export is
    # absolute paths appear by file name only (the card is meant to be published); the JSON keeps them whole
    assert f"`{RECIPE.name}` (sha256" in readme and f"`{tiny_run['overlay'].name}` (sha256" in readme
    assert str(tiny_run["folder"]) not in readme.split("## Resolved configuration")[0].replace(
        " ".join(tiny_run["args"]), "")
    assert _yaml_block(readme) == run_config
    assert "No red-team results" in readme


def test_export_card_carries_the_red_team_summary(tiny_run, tmp_path, capsys):
    hf, rt = tmp_path / "hf", tmp_path / "rt"
    assert main(["export", "--ckpt", str(tiny_run["last"]), "--out", str(hf)]) == 0
    assert redteam_main(["--model", str(hf), "--suite", "durability", "--scale", "0.05", "--seeds", "1",
                         "--attacks", "d04,d05", "--max_steps", "2", "--out", str(rt), "--progress", "false"]) == 0
    assert main(["export", "--ckpt", str(tiny_run["last"]), "--out", str(hf), "--overwrite",
                 "--redteam", str(rt)]) == 0
    facts, readme = _card(hf)
    results = json.loads((rt / "results.json").read_text())
    red, aggregate = facts["redteam"], results["aggregate"]
    assert red["folder"] == str(rt.resolve()) and red["suite"] == "durability" and red["runs"] == 2
    assert red["model"]["source"] == str(hf)  # the red team attacked this export
    assert red["suite_mean"] == aggregate["suite_mean"]
    assert red["worst_case"] == aggregate["worst_case"]
    assert red["bounded_worst_case"] == aggregate["bounded_worst_case"]
    assert red["broken"] == aggregate["broken"]
    assert red["safety"]["metric"] == "forget_loss"
    for attack in ("d04", "d05"):
        assert red["attacks"][attack]["safety_after"] == aggregate["attacks"][attack]["safety_after"]
    assert "Suite `durability`, 2 run(s)" in readme
    assert f"| suite mean | | {aggregate['suite_mean']:.4f} |" in readme
    assert f"| worst case | {aggregate['worst_case']['attack']} |" in readme


def test_export_refuses_a_red_team_folder_without_results(tiny_run, tmp_path, capsys):
    last = tiny_run["last"]
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished"
    (unfinished / "runs").mkdir(parents=True)
    (unfinished / "runs" / "d04__seed0.json").write_text("{}")
    cases = [(empty, "no results.json (not the --out folder of tar-lightning redteam)"),
             (unfinished, "no results.json (1 run file(s) in runs/ but no summary: the red team has not finished"),
             (tmp_path / "missing", "no such folder")]
    for folder, reason in cases:
        out = tmp_path / f"hf_{folder.name}"
        assert main(["export", "--ckpt", str(last), "--out", str(out), "--redteam", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tar-lightning export: error: --redteam") and str(folder) in err and reason in err, err
        assert not out.exists()  # checked before anything is written


def test_card_of_a_checkpoint_without_a_run_record_says_so(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run["last"], map_location="cpu", weights_only=True)
    del ckpt[RUN_RECORD_KEY]
    ckpt["hyper_parameters"]["model"] = None  # a module given its model as a Python object
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    assert main(["export", "--ckpt", str(bare), "--out", str(tmp_path / "hf")]) == 0
    facts, readme = _card(tmp_path / "hf")
    assert facts["run"] is None and facts["base_model"] is None
    assert facts["checkpoint"]["global_step"] == 2
    assert "Recipe and resolved configuration: not recorded" in readme
    assert "Base model: not recorded" in readme


def test_a_malformed_red_team_summary_is_a_data_error_naming_the_file(tmp_path):
    from tar_lightning.errors import DataError
    from tar_lightning.export import read_redteam_summary

    suite = {"name": "durability", "evaluation": {"safety": {}, "capability": {}}}
    (tmp_path / "results.json").write_text(json.dumps({"summary": {"suite": suite}, "aggregate": {"attacks": {"d01": 3}}}))
    with pytest.raises(DataError, match=r"results\.json: not a results\.json written by tar-lightning redteam"):
        read_redteam_summary(tmp_path)
