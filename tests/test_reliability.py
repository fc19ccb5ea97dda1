"""Reliability: the non-finite guard, atomic checkpoint/export/result writes, safe loading, trust_remote_code."""

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import random_bundle
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, ConfigError, ModelLoadError, TARConfig, TARModule
from tar_lightning.checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    NonFiniteError,
    atomic_save,
    load_checkpoint,
    tar_trainer_plugins,
)
from tar_lightning.errors import TARLightningError
from tar_lightning.models import ModelSource, tiny_llama

REPO = Path(__file__).resolve().parents[1]

# Forward passes of the policy per outer step with K=2, tr_every=1, one trajectory, no reference model:
# adversary k0, TR after k0, adversary k1, TR after k1, retain.
CALLS_PER_STEP = 5


class NaNAt:
    """A forward hook on the policy that turns the logits of chosen forward calls into NaN."""

    def __init__(self, calls):
        self.calls = set(calls)
        self.count = 0

    def __call__(self, module, args, output):
        call = self.count
        self.count += 1
        if call in self.calls:
            output["logits"] = output["logits"] * float("nan")
        return output


class Recorder(L.Callback):
    """Weights and optimizer step counts before and after every training batch."""

    def __init__(self):
        self.before, self.after, self.opt_steps, self.global_steps = [], [], [], []

    @staticmethod
    def _weights(module):
        return [p.detach().clone() for p in module.model.parameters()]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(self._weights(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(self._weights(module))
        state = trainer.optimizers[0].state_dict()["state"]
        self.opt_steps.append(int(state[0]["step"]) if state else 0)
        self.global_steps.append(trainer.global_step)


def tiny_tar(max_nonfinite=5, **cfg_kw):
    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(lr=1e-3)],
                    max_nonfinite_in_a_row=max_nonfinite, **cfg_kw)
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    batches = [random_bundle(len(tok), cfg.stream_steps(), seed=s) for s in range(4)]
    return module, batches


def trainer_for(max_steps, callbacks=(), **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_steps=max_steps, log_every_n_steps=1, callbacks=list(callbacks))
    defaults.update(kw)
    return L.Trainer(**defaults)


# ------------------------------------------------------------------------------------------ non-finite guard
@pytest.mark.parametrize("where,offset", [("adversary loss", 0), ("TR loss", 1), ("retain loss", 4)])
def test_a_nan_skips_the_outer_update_and_restores_the_weights(where, offset):
    module, batches = tiny_tar()
    hook = NaNAt({CALLS_PER_STEP + offset})  # in outer step 1 (the second batch)
    module.model.register_forward_hook(hook)
    rec = Recorder()
    trainer = trainer_for(3, [rec])
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    # 4 batches for 3 optimizer steps: batch 1 was skipped
    assert len(rec.before) == 4
    assert rec.global_steps == [1, 1, 2, 3]
    assert rec.opt_steps == [1, 1, 2, 3]
    for b, a in zip(rec.before[1], rec.after[1], strict=True):
        assert torch.equal(b, a)  # bit-identical to before the step
    for i in (0, 2, 3):  # the other steps did update
        assert any(not torch.equal(b, a) for b, a in zip(rec.before[i], rec.after[i], strict=True))
    for w in rec.after[-1]:
        assert torch.isfinite(w).all()
    assert trainer.callback_metrics["train/nonfinite_total"] == 1.0
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 0.0
    assert module._nonfinite_total == 1 and module._nonfinite_in_a_row == 0


def test_too_many_nonfinite_steps_in_a_row_stop_training_with_our_error():
    module, batches = tiny_tar(max_nonfinite=3)
    start = [p.detach().clone() for p in module.model.parameters()]
    hook = NaNAt(range(CALLS_PER_STEP, 100))  # every step after the first
    module.model.register_forward_hook(hook)
    rec = Recorder()
    trainer = trainer_for(4, [rec])
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError,
                                                                      match="3 outer steps in a row"):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    assert len(rec.before) == 4 and trainer.global_step == 1  # batch 0 trained, batches 1-3 skipped
    for p, s in zip(module.model.parameters(), rec.after[0], strict=True):
        assert torch.equal(p.detach(), s)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(module.model.parameters(), start, strict=True))
    assert isinstance(NonFiniteError("x"), TARLightningError)


def test_max_nonfinite_in_a_row_is_validated():
    with pytest.raises(ConfigError, match="max_nonfinite_in_a_row"):
        TARConfig(max_nonfinite_in_a_row=0).validate()
    with pytest.raises(ConfigError, match="max_nonfinite_in_a_row"):
        TARConfig(max_nonfinite_in_a_row="3").validate()


def test_nonfinite_counter_is_checkpointed(tmp_path):
    module, batches = tiny_tar()
    module.model.register_forward_hook(NaNAt({CALLS_PER_STEP}))
    trainer = trainer_for(2, plugins=tar_trainer_plugins())
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = load_checkpoint(tmp_path / "a.ckpt")
    assert ckpt["tar_nonfinite"] == {"in_a_row": 0, "total": 1}
    other, _ = tiny_tar()
    other.on_load_checkpoint(ckpt)
    assert other._nonfinite_total == 1


def test_weights_with_nan_are_never_saved(tmp_path):
    module, batches = tiny_tar()
    ckpt = tmp_path / "last.ckpt"
    trainer = trainer_for(1, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(ckpt)
    good = ckpt.read_bytes()
    with torch.no_grad():
        next(module.model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        trainer.save_checkpoint(ckpt)
    assert ckpt.read_bytes() == good
    # the plugin refuses too, for modules without the check of their own
    with pytest.raises(NonFiniteError, match="model.embed_tokens.weight"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"model.embed_tokens.weight": torch.tensor([float("inf")])}},
                                             ckpt)
    assert ckpt.read_bytes() == good


def test_lora_targets_matching_no_module_fail_before_training():
    model, tok = tiny_llama()
    lora = AdversaryConfig(name="typo", method="lora", lr=1e-3, lora={"rank": 2, "targets": ["q_proj", "v_prj"]})
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(name="full", lr=1e-3), lora])
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    rec = Recorder()
    batches = [random_bundle(len(tok), cfg.stream_steps(), seed=0)]
    with pytest.raises(ConfigError, match=r"'typo'.*\['v_prj'\].*q_proj"):
        trainer_for(1, [rec]).fit(module, DataLoader(batches, batch_size=None))
    assert rec.before == []  # no training step ran


# ------------------------------------------------------------------------------------------ atomic writes
class FullDisk:
    """``torch.save`` stand-in: writes part of the real bytes, then fails as a full disk does."""

    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, obj, f, *args, **kwargs):
        self.calls += 1
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    module, batches = tiny_tar()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = trainer_for(2, [ckpt_cb], enable_checkpointing=True, plugins=tar_trainer_plugins())
    trainer.fit(module, DataLoader(batches, batch_size=None))
    last = tmp_path / "last.ckpt"
    before = last.read_bytes()
    assert load_checkpoint(last)["global_step"] == 2

    full = FullDisk(torch.save)
    monkeypatch.setattr(torch, "save", full)
    module2, _ = tiny_tar()
    trainer2 = trainer_for(3, [ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1,
                                               save_top_k=-1)], enable_checkpointing=True,
                           plugins=tar_trainer_plugins())
    with pytest.raises(CheckpointWriteError, match="No space left on device") as err:
        trainer2.fit(module2, DataLoader(batches, batch_size=None), ckpt_path=str(last))
    assert full.calls == 1
    assert str(tmp_path) in str(err.value)
    monkeypatch.undo()
    assert last.read_bytes() == before
    state = load_checkpoint(last)
    assert state["global_step"] == 2 and "state_dict" in state
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_atomic_save_error_mid_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    atomic_save({"a": torch.arange(3)}, path)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        atomic_save({"a": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]


def test_export_failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    from tar_lightning.models import export_pretrained

    model, tok = tiny_llama()
    out = export_pretrained(model, tok, tmp_path / "hf")
    files = sorted(p.name for p in out.iterdir())

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises((TARLightningError, OSError)):
        export_pretrained(model, tok, tmp_path / "hf", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == files  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_redteam_result_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    from tar_lightning.evaluation.redteam import io as redteam

    path = tmp_path / "runs" / "a.json"
    redteam.write_text(path, '{"ok": 1}')
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        redteam.write_text(path, '{"ok": 2}')
    monkeypatch.undo()
    assert path.read_text() == '{"ok": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


# ------------------------------------------------------------------------------------------ security
class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "evil": Payload()}, path)
    with pytest.raises(ModelLoadError, match="never unpickled"):
        load_checkpoint(path)
    with pytest.raises(ModelLoadError):
        AtomicCheckpointIO().load_checkpoint(path)
    from tar_lightning.export import checkpoint_to_model

    with pytest.raises(ModelLoadError, match="arbitrary Python objects"):
        checkpoint_to_model(path)
    # a plain pickle file is refused as well
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError):
        load_checkpoint(raw)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "t.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelLoadError, match="t.ckpt"):
        load_checkpoint(path)


def test_trust_remote_code_is_off_unless_set():
    assert ModelSource("tiny-llama").trust_remote_code is False
    assert ModelSource("tiny-llama", trust_remote_code=True).trust_remote_code is True
    with pytest.raises(ConfigError, match="trust_remote_code"):
        ModelSource("tiny-llama", trust_remote_code="yes").validate()


def test_every_torch_load_in_src_is_weights_only():
    """Static check: no ``torch.load`` call in the library without ``weights_only=True``."""
    result = subprocess.run(
        [sys.executable, "-c", _SCAN], cwd=REPO / "src", capture_output=True, text=True, check=True
    )
    calls = result.stdout.split()
    assert calls, "the scan found no torch.load call at all (export.py has one)"
    assert all(c.endswith(":ok") for c in calls), calls


_SCAN = r"""
import ast, pathlib
for path in sorted(pathlib.Path('tar_lightning').rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'load' and \
                getattr(node.func.value, 'id', None) == 'torch':
            ok = any(k.arg == 'weights_only' and getattr(k.value, 'value', None) is True for k in node.keywords)
            print(f"{path}:{node.lineno}:{'ok' if ok else 'UNSAFE'}")
"""


def test_the_cli_writes_checkpoints_atomically(tmp_path, monkeypatch):
    from tar_lightning.cli import TARCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["tar-lightning"])
    cli = TARCLI(args=["--config", str(REPO / "recipes" / "tiny" / "tar.yaml"), "--trainer.logger", "false"],
                 run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
