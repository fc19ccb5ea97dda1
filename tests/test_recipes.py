"""Every shipped YAML against the real code, the tiny recipes end to end through the CLI, and CLI bad input.

Parsing never instantiates a model: :class:`_ParseOnlyCLI` is TARCLI with ``instantiate_classes`` doing nothing
and ``run=False``, so jsonargparse type-checks every key and value of a recipe (class paths, init args,
dataclass fields) while hub models and datasets are never touched. The parsed config is then checked
semantically: the data module is built (it only builds :class:`DataSource` objects, reading no data), the
TAR config is built and validated, and every stream the module needs must be configured.
"""

from __future__ import annotations

import csv
import importlib
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tar_lightning import RandomMappingModule, RMUModule, SFTModule, TARDataModule, TARModule, UnlearnModule
from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.cli import TARCLI, main
from tar_lightning.export import checkpoint_to_model
from tar_lightning.models import ModelSource, load_model, tiny_tokenizer
from tar_lightning.tar_config import TARConfig

REPO = Path(__file__).resolve().parents[1]
#: recipes an overlay (a YAML without a top-level ``model``, e.g. callbacks/*.yaml) is parsed on top of
OVERLAY_BASE = REPO / "recipes" / "tiny" / "tar.yaml"
EXPECTED = {
    "recipes/tiny/tar.yaml",
    "recipes/tiny/random_mapping.yaml",
    "recipes/tiny/rmu.yaml",
    "recipes/tiny/unlearn.yaml",
    "recipes/stage1/bio_llama3_8b.yaml",
    "recipes/tar/bio_llama3_8b.yaml",
    "recipes/tar/chem_llama3_8b.yaml",
    "recipes/tar/cyber_llama3_8b.yaml",
    "recipes/tar/refusal_llama3_8b.yaml",
    "recipes/refusal/tar_smollm2.yaml",
    "recipes/refusal/benign_sft.yaml",
    "recipes/refusal/refusal_sft_smollm2.yaml",
}


#: plain YAML read by their own loaders (``load_suite``, ``load_demo_config``; tested there), not LightningCLI recipes
NOT_CLI = (REPO / "recipes" / "redteam", REPO / "recipes" / "demo")


def _yaml_files() -> list[Path]:
    return sorted(
        p
        for folder in ("recipes", "callbacks")
        for p in (REPO / folder).rglob("*")
        if p.suffix in (".yaml", ".yml") and not any(folder in p.parents for folder in NOT_CLI)
    )


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _is_overlay(path: Path) -> bool:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return not (isinstance(data, dict) and "model" in data)


@pytest.fixture(autouse=True)
def _isolate_global_state(monkeypatch):
    """The CLI seeds every RNG and sets PL_* variables; keep that from leaking into other test files."""
    monkeypatch.setattr(
        sys, "argv", ["tar-lightning"]
    )  # LightningCLI warns when args and sys.argv both exist
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(var, "0")  # records the original value, restored after the test
        monkeypatch.delenv(var)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


# ----------------------------------------------------------------------------------------------- parsing
class _ParseOnlyCLI(TARCLI):
    """TARCLI that parses and type-checks but instantiates nothing (no model loads, no network)."""

    def instantiate_classes(self) -> None:
        pass


def _parse(*configs: Path):
    args = [arg for config in configs for arg in ("--config", str(config))]
    return _ParseOnlyCLI(args=args, run=False).config


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _tar_config(config: dict, where: str) -> TARConfig:
    raw = dict(config)
    adversaries = [
        AdversaryConfig.from_dict(a, where=f"{where}, adversaries[{i}]")
        for i, a in enumerate(raw.pop("adversaries"))
    ]
    return TARConfig(**raw, adversaries=adversaries).validate()


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _check_semantics(cfg, where: str) -> dict:
    """Build what can be built without models or data; returns the module class, data module, TAR config and
    the module's init args."""
    unresolved = [s for s in _strings(cfg.as_dict()) if "${" in s]
    assert not unresolved, f"{where}: OmegaConf interpolations left unresolved: {unresolved}"
    data_cls = _import(cfg.data.class_path)
    assert issubclass(data_cls, TARDataModule), f"{where}: data is {cfg.data.class_path}"
    data_args = cfg.data.init_args.as_dict()
    datamodule = data_cls(**data_args)  # builds and checks every DataSource; reads nothing

    module_cls = _import(cfg.model.class_path)
    model_args = cfg.model.init_args.as_dict()
    tar_config = None
    if issubclass(module_cls, TARModule):
        tar_config = _tar_config(model_args["config"], where)
        needed = tar_config.stream_steps()
    elif issubclass(module_cls, (RandomMappingModule, RMUModule, UnlearnModule)):
        needed = {model_args["retain_stream"]: 1, model_args["forget_stream"]: 1}
    elif issubclass(module_cls, SFTModule):
        streams = model_args.get("streams") or {"retain": 1.0}  # the default
        needed = {name: 1 for name, weight in streams.items() if weight > 0}
    else:
        pytest.fail(
            f"{where}: module {cfg.model.class_path} is not covered by this test; extend _check_semantics"
        )
    missing = sorted(set(needed) - set(datamodule.streams))
    assert not missing, (
        f"{where}: streams {missing} are needed by the module but not configured under data.init_args.streams"
    )
    unused = sorted(set(datamodule.streams) - set(needed))
    assert not unused, f"{where}: streams {unused} are configured but the module never reads them (a typo?)"

    for key in ("model", "reference_model"):
        value = model_args.get(key)
        if isinstance(value, dict):
            ModelSource(**value)
        elif isinstance(value, str):
            ModelSource(value)
    return {"module": module_cls, "data": datamodule, "tar_config": tar_config, "model_args": model_args}


def test_discovered_recipes_include_the_shipped_ones():
    found = {_rel(p) for p in _yaml_files()}
    assert found, "no YAML found under recipes/ or callbacks/"
    assert found >= EXPECTED | {"callbacks/retain_monitor.yaml"}, sorted(EXPECTED - found)


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses_and_validates(path):
    configs = (OVERLAY_BASE, path) if _is_overlay(path) else (path,)
    cfg = _parse(*configs)
    _check_semantics(cfg, _rel(path))
    if _is_overlay(path):
        base = _parse(OVERLAY_BASE)
        added = yaml.safe_load(path.read_text(encoding="utf-8")).get("trainer", {}).get("callbacks+", [])
        assert len(cfg.trainer.callbacks) == len(base.trainer.callbacks) + len(added)


PAPER = {
    # recipe: (λ_TR, adversary LRs, adversary names -> probability)
    "recipes/tar/bio_llama3_8b.yaml": (
        4.0,
        [2e-6, 2e-5, 4e-5],
        {"pile_bio_sft": 1.0, "camel_bio_sft": 1.0, "retain_to_forget": 1.0},
    ),
    "recipes/tar/cyber_llama3_8b.yaml": (4.0, [2e-5, 4e-5], {"forget_sft": 0.5, "retain_to_forget": 0.5}),
    "recipes/tar/chem_llama3_8b.yaml": (
        3.0,
        [2e-5, 4e-5],
        {"forget_sft": 1.0, "retain_sft": 1.0, "retain_to_forget": 1.0},
    ),
}


@pytest.mark.parametrize("rel", sorted(PAPER))
def test_tar_paper_recipes_hold_the_paper_settings(rel):
    cfg = _parse(REPO / rel)
    checked = _check_semantics(cfg, rel)
    tar, dm, args = checked["tar_config"], checked["data"], checked["model_args"]
    tr_weight, lrs, mix = PAPER[rel]
    assert cfg.trainer.max_steps == 750 and cfg.trainer.precision == "bf16-mixed"
    assert args["optimizer"]["class_path"] == "schedulefree.AdamWScheduleFree"
    assert (
        args["optimizer"]["init_args"]["lr"] == 2e-5 and args["optimizer"]["init_args"]["warmup_steps"] == 32
    )
    assert (tar.inner_steps, tar.tr_every, tar.trajectories) == (64, 4, 1)
    assert (tar.tr_loss, tar.weighting, tar.weighting_rate) == ("max_entropy", "exponential", 0.0625)
    assert (tar.tr_weight, tar.retain_weight, tar.retain_representation) == (tr_weight, 1.0, True)
    assert args["reference_model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert args["model"]["tokenizer"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert {a.name: a.probability for a in tar.adversaries} == mix
    for adv in tar.adversaries:
        assert (adv.method, adv.optimizer, adv.schedule, adv.weight_decay) == (
            "full",
            "adamw",
            "constant",
            0.01,
        )
        assert adv.lr == lrs
        if adv.switch is not None:
            assert adv.switch.beta == (6.0, 3.0)
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    assert dm.seq_len == 256
    assert dm.batch_size_of(tar.retain_stream) * world == 64 and dm.batch_size_of(tar.tr_stream) * world == 64
    adversary_streams = {a.data for a in tar.adversaries} | {
        a.switch.retain_stream for a in tar.adversaries if a.switch
    }
    assert {dm.batch_size_of(s) * world for s in adversary_streams} == {32}
    # The held-out TR text and the attacker's text are disjoint parts of the same corpus.
    tr, forget = dm.streams[tar.tr_stream], dm.streams[tar.adversaries[0].data]
    assert (tr.path, tr.filter, tr.select, forget.select) == (forget.path, forget.filter, "80%:", "0:80%")


def test_stage1_paper_recipe_holds_the_paper_settings():
    rel = "recipes/stage1/bio_llama3_8b.yaml"
    cfg = _parse(REPO / rel)
    checked = _check_semantics(cfg, rel)
    args, dm = checked["model_args"], checked["data"]
    assert args["model"]["source"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    opt = args["optimizer"]
    assert opt["class_path"] == "schedulefree.AdamWScheduleFree"
    assert (opt["init_args"]["lr"], opt["init_args"]["warmup_steps"]) == (1e-5, 100)
    assert 600 <= cfg.trainer.max_steps <= 1000 and cfg.trainer.precision == "bf16-mixed"
    assert (
        dm.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches
        == 64
    )
    assert dm.seq_len == 256
    assert dm.streams["forget"].filter == {"label": True} and dm.streams["retain"].filter == {"label": False}


# ----------------------------------------------------------------------------------------------- tiny runs
def _redirect_overlay(recipe: Path, out: Path, folder: Path) -> Path:
    """An overlay replacing the recipe's callbacks list with the same callbacks writing under ``out``."""
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    callbacks = data["trainer"]["callbacks"]
    redirected = 0
    for cb in callbacks:
        if "dirpath" in cb.get("init_args", {}):
            cb["init_args"]["dirpath"] = str(out / "checkpoints")
            redirected += 1
    assert redirected, f"{recipe}: no callback with a dirpath to redirect"
    overlay = folder / f"redirect_{recipe.stem}.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}), encoding="utf-8")
    return overlay


def _metrics(out: Path) -> list[dict]:
    files = list(out.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(
    "recipe, extra",
    [("recipes/tiny/random_mapping.yaml", []), ("recipes/tiny/tar.yaml", ["callbacks/retain_monitor.yaml"])],
    ids=["random_mapping", "tar+retain_monitor"],
)
def test_tiny_recipe_runs_end_to_end_and_exports(recipe, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything written to a relative path the overrides missed lands here
    recipe_path = REPO / recipe
    out = tmp_path / "run"
    overlay = _redirect_overlay(recipe_path, out, tmp_path)
    args = ["fit", "--config", str(recipe_path), "--config", str(overlay)]
    for e in extra:
        args += ["--config", str(REPO / e)]
    args += ["--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["redirect_" + recipe_path.stem + ".yaml", "run"]

    max_steps = yaml.safe_load(recipe_path.read_text())["trainer"]["max_steps"]
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == max_steps
    rows = _metrics(out)
    train_steps = {int(r["step"]) for r in rows if any(k.startswith("train/") and v for k, v in r.items())}
    assert train_steps == set(range(max_steps))
    if extra:
        ratios = [r["retain_monitor/ratio"] for r in rows if r.get("retain_monitor/ratio")]
        assert ratios and all(float(x) > 0 for x in ratios)

    hf = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", "--ckpt", str(last), "--out", str(hf)]) == 0
    assert str(hf) in capsys.readouterr().out
    exported, tok = load_model(str(hf))
    expected, _ = checkpoint_to_model(last)  # schedule-free: weights at the evaluation point, as exported
    want = {k[len("model.") :] for k in ckpt["state_dict"] if k.startswith("model.")}
    got = exported.state_dict()
    assert set(got) == want == set(expected.state_dict())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name

    tiny = tiny_tokenizer()
    sample = "The virus binds the host receptor; incubation takes 5 days."
    assert tok(sample)["input_ids"] == tiny(sample)["input_ids"]
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (tiny.pad_token, tiny.eos_token, tiny.bos_token)


# ----------------------------------------------------------------------------------------------- bad input
def _variant(tmp_path: Path, old: str, new: str, recipe: str = "recipes/tiny/tar.yaml") -> Path:
    text = (REPO / recipe).read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {recipe}"
    path = tmp_path / f"bad_{Path(recipe).name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def _quiet_outputs(tmp_path: Path) -> list[str]:
    out = tmp_path / "run"
    return ["--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.max_steps", "1"]  # fmt: skip


def test_missing_config_file_names_it(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(missing)])
    assert info.value.code not in (0, None)
    assert str(missing) in capsys.readouterr().err


def test_typo_in_tar_config_names_the_key(tmp_path, capsys):
    bad = _variant(tmp_path, "inner_steps: 4 ", "inner_stepz: 4 ")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(bad), *_quiet_outputs(tmp_path)])
    assert info.value.code not in (0, None)
    assert "inner_stepz" in capsys.readouterr().err


def test_unknown_adversary_optimizer_returns_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _variant(tmp_path, "optimizer: adamw ", "optimizer: adamz ")
    assert main(["fit", "--config", str(bad), *_quiet_outputs(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "adamz" in err and "optimizer" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_missing_data_file_returns_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "forget.jsonl"
    bad = _variant(
        tmp_path, "path: synthetic:forget ", f"path: {missing} ", recipe="recipes/tiny/random_mapping.yaml"
    )
    assert main(["fit", "--config", str(bad), *_quiet_outputs(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err


def test_unknown_command_returns_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err


def test_export_of_missing_checkpoint_returns_2(tmp_path, capsys):
    missing = tmp_path / "nope" / "last.ckpt"
    assert main(["export", "--ckpt", str(missing), "--out", str(tmp_path / "hf")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------- scale-out overlays (issue 5)
PAPER_RECIPES = sorted((REPO / "recipes" / "tar").glob("*.yaml")) + sorted((REPO / "recipes" / "stage1").glob("*.yaml"))
LAUNCH = {"recipes/launch/fsdp2_8gpu.yaml": (8, 1), "recipes/launch/fsdp2_2node.yaml": (8, 2)}
_BASE_PARSES: dict = {}


@pytest.mark.parametrize("overlay", sorted(LAUNCH))
@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=_rel)
def test_paper_recipes_parse_under_the_fsdp2_overlays(recipe, overlay):
    """Each paper recipe + overlay (+ the Slurm requeue callback, as the sbatch templates add it) parses, is
    semantically valid, and yields a FSDP2 strategy TARModule accepts, with Lightning's auto-requeue off."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tar_lightning.sharding import ShardingConfig
    from tar_lightning.strategy import check_strategy

    devices, nodes = LAUNCH[overlay]
    cfg = _parse(recipe, REPO / overlay, REPO / "callbacks" / "slurm_requeue.yaml")
    built = _check_semantics(cfg, f"{_rel(recipe)} + {overlay}")
    base = _BASE_PARSES.get(recipe) or _BASE_PARSES.setdefault(recipe, _parse(recipe))
    assert cfg.model.as_dict() == base.model.as_dict()  # the overlay changes the trainer only
    assert cfg.data.as_dict() == base.data.as_dict()
    trainer = cfg.trainer
    assert (trainer.devices, trainer.num_nodes, trainer.accelerator) == (devices, nodes, "gpu")
    assert trainer.precision == base.trainer.precision == "bf16-mixed"
    strategy = _import(trainer.strategy.class_path)(**trainer.strategy.init_args.as_dict())
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._data_parallel_size == devices * nodes and strategy._tensor_parallel_size == 1
    check_strategy(strategy)  # what TARModule runs on the trainer's strategy
    (plugin,) = trainer.plugins
    env = _import(plugin.class_path)(**plugin.init_args.as_dict())
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    callbacks = [c.class_path for c in trainer.callbacks]
    assert callbacks[-1] == "tar_lightning.callbacks.SlurmRequeue"
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks  # what --ckpt_path last resumes from
    if built["tar_config"] is not None:  # the paper's bf16 mixed precision becomes the FSDP2 policy
        sharding = ShardingConfig.from_value(built["model_args"].get("sharding"))
        assert sharding.policy_dtypes(trainer.precision) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("recipe", ["recipes/tar/bio_llama3_8b.yaml", "recipes/stage1/bio_llama3_8b.yaml"])
def test_interpolations_resolve_under_the_fit_subcommand(recipe, tmp_path):
    """``tar-lightning fit`` nests the config under ``fit.``: interpolations are relative so they resolve there
    too (an absolute ``${trainer.default_root_dir}`` is not found under the subcommand)."""
    import subprocess

    root = tmp_path / "root"
    proc = subprocess.run(
        [sys.executable, "-m", "tar_lightning.cli", "fit", "--config", recipe, "--config",
         "recipes/launch/fsdp2_8gpu.yaml", "--trainer.default_root_dir", str(root), "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(root)
    checkpoint = next(c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["dirpath"] == f"{root}/checkpoints"
    assert "${" not in proc.stdout
