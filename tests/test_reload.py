"""Reloading every module from its checkpoints: ``Module.load_from_checkpoint(path)`` and
``tar-lightning fit|validate --ckpt_path PATH``, for ``.ckpt`` files and sharded FSDP2 checkpoint folders.

The recorded hyperparameters round-trip through the constructors: a module built by the CLI records the CLI's
configuration (re-instantiated by Lightning's allow-listed instantiator), one built in Python its arguments as
plain data (configs as mappings, the model source), and nothing else is ever unpickled.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import launch_env
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, RandomMappingModule, SFTModule, TARConfig, TARModule
from tar_lightning.cli import main
from tar_lightning.errors import ConfigError
from tar_lightning.models import tiny_llama

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


#: a held-out stream for ``tar-lightning validate`` (which refuses to run without validation data)
VAL_STREAM = ("--data.init_args.val_streams",
              '{"heldout": {"path": "synthetic:forget", "synthetic": {"n": 40, "seed": 1}, "limit": 8}}')


def derived_recipe(name: str, run: Path, *, drop_lora: bool = False, **trainer) -> Path:
    """``recipes/tiny/<name>.yaml`` with its run folder, checkpoints (every step, last kept) and logs under ``run``."""
    recipe = yaml.safe_load((RECIPES / "tiny" / f"{name}.yaml").read_text())
    recipe["trainer"].update(
        default_root_dir=str(run), logger=False, enable_progress_bar=False,
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True,
                                  "every_n_train_steps": 1}}],
        **trainer,
    )
    if drop_lora:
        config = recipe["model"]["init_args"]["config"]
        config["adversaries"] = [a for a in config["adversaries"] if a.get("method") != "lora"]
    path = run.parent / f"{name}.{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def assert_plain(value, where="hyper_parameters") -> None:
    """Only data weights_only loading accepts and a constructor can take: no pickled objects."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), where
            assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str)), f"{where}: {type(value).__name__}"


def assert_same_state(module: L.LightningModule, state: dict) -> None:
    mine = module.state_dict()
    assert mine.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(mine[k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("name,cls", [("tar", TARModule), ("random_mapping", RandomMappingModule)])
def test_cli_explicit_ckpt_path_fit_validate_and_load_from_checkpoint(tmp_path, monkeypatch, name, cls):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    recipe = derived_recipe(name, run, max_steps=2)
    assert main(["fit", "--config", str(recipe)]) == 0
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 2
    assert_plain(first["hyper_parameters"])

    # an explicit path (not "last"): the module's recorded CLI arguments are re-parsed, then the run goes on
    assert main(["validate", "--config", str(recipe), "--ckpt_path", str(last), *VAL_STREAM]) == 0
    assert main(["fit", "--config", str(recipe), "--trainer.max_steps=3", "--ckpt_path", str(last)]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 3

    module = cls.load_from_checkpoint(last)
    assert type(module) is cls
    assert_same_state(module, torch.load(last, weights_only=True)["state_dict"])


def _fit_and_save(module, bundle_factory, path: Path, steps: dict[str, int], vocab: int) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([bundle_factory(vocab, steps, seed=0)], batch_size=None))
    trainer.save_checkpoint(path)


def _tar_config(**kw) -> TARConfig:
    return TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(lr=[1e-3, 2e-3])], clip_grad_norm=0.5,
                     **kw)


def _build(case: str):
    if case == "tar_source":  # a source string: a representation reference rebuilt from it
        return TARModule("tiny-llama", _tar_config(retain_representation=True),
                         optimizer=lambda p: torch.optim.SGD(p, lr=1e-2), sharding={"param_dtype": "none"})
    if case == "tar_module":  # an in-memory model: rebuilt from the checkpoint's own metadata
        model, tok = tiny_llama()
        return TARModule(model, _tar_config(), optimizer=lambda p: torch.optim.SGD(p, lr=1e-2), tokenizer=tok)
    if case == "random_mapping":
        return RandomMappingModule("tiny-llama", optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
                                   forget_weight=0.5, table_seed=7)
    model, tok = tiny_llama()
    return SFTModule(model, tokenizer=tok, optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
                     streams={"forget": 0.5, "retain": 0.5})


@pytest.mark.parametrize("case", ["tar_source", "tar_module", "random_mapping", "sft"])
def test_load_from_checkpoint_of_modules_built_in_python(tmp_path, bundle_factory, case):
    torch.set_num_threads(1)
    module = _build(case)
    vocab = module.model.get_input_embeddings().num_embeddings
    path = tmp_path / "m.ckpt"
    _fit_and_save(module, bundle_factory, path, module.stream_steps(), vocab)
    ckpt = torch.load(path, weights_only=True)
    assert_plain(ckpt["hyper_parameters"])

    loaded = type(module).load_from_checkpoint(path)
    assert type(loaded) is type(module)
    assert_same_state(loaded, ckpt["state_dict"])
    assert loaded.tokenizer is not None
    if isinstance(module, TARModule):
        assert loaded.config == module.config
        assert loaded.sharding == module.sharding
        if module.config.retain_representation:  # the reference holds the source's (starting) weights
            start, _ = tiny_llama()
            ref = dict(loaded.reference_model.named_parameters())
            for n, p in start.named_parameters():
                assert torch.equal(ref[n], p), n
    elif isinstance(module, RandomMappingModule):
        assert (loaded.forget_weight, loaded.table_seed) == (0.5, 7)
        assert torch.equal(loaded.table, module.table)
    else:
        assert loaded.streams == {"forget": 0.5, "retain": 0.5}


def test_load_from_checkpoint_refuses_to_guess_an_unrecorded_reference(tmp_path, bundle_factory):
    """An in-memory model with a representation reference "copy of the model as given": the starting weights are
    not recorded, and rebuilding the model from the trained ones would silently change the reference."""
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    module = TARModule(model, _tar_config(retain_representation=True), tokenizer=tok,
                       optimizer=lambda p: torch.optim.SGD(p, lr=1e-2))
    path = tmp_path / "m.ckpt"
    _fit_and_save(module, bundle_factory, path, module.stream_steps(), len(tok))
    with pytest.raises(ConfigError, match="reference_model"):
        TARModule.load_from_checkpoint(path)
    loaded = TARModule.load_from_checkpoint(path, reference_model="tiny-llama")
    assert_same_state(loaded, torch.load(path, weights_only=True)["state_dict"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = launch_env()
    proc = subprocess.run([sys.executable, "-m", "tar_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_sharded_checkpoint_folder_explicit_ckpt_path_and_load_from_checkpoint(tmp_path):
    """FSDP2 (2 gloo processes): the sharded folder resumes through an explicit --ckpt_path, validates, and
    TARModule.load_from_checkpoint consolidates it in one process."""
    run = tmp_path / "run"
    recipe = derived_recipe("tar", run, drop_lora=True, max_steps=1, devices=2, strategy={
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": True}})
    _cli("fit", "--config", str(recipe), cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file()
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 1

    module = TARModule.load_from_checkpoint(last)
    from tar_lightning.export import read_checkpoint

    assert_same_state(module, read_checkpoint(last)["state_dict"])
    assert module.config.retain_representation and module.reference_model is not None

    _cli("validate", "--config", str(recipe), "--ckpt_path", str(last), *VAL_STREAM, cwd=tmp_path)
    _cli("fit", "--config", str(recipe), "--trainer.max_steps=2", "--ckpt_path", str(last), cwd=tmp_path)
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2


def test_load_from_checkpoint_hparams_file_is_read_as_plain_yaml(tmp_path, bundle_factory):
    torch.set_num_threads(1)
    module = _build("random_mapping")
    path = tmp_path / "m.ckpt"
    _fit_and_save(module, bundle_factory, path, module.stream_steps(), module.model.get_input_embeddings().num_embeddings)
    good = tmp_path / "hparams.yaml"
    good.write_text("model: tiny-llama\nforget_weight: 2.0\ntable_seed: 7\n")
    loaded = RandomMappingModule.load_from_checkpoint(path, hparams_file=good)
    assert (loaded.forget_weight, loaded.table_seed) == (2.0, 7)
    assert_same_state(loaded, torch.load(path, weights_only=True)["state_dict"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        RandomMappingModule.load_from_checkpoint(path, hparams_file=bad)
    assert not (tmp_path / "ran").exists()
