"""What the stage-1 and SFT modules log, pinned: dashboards, the demo and the training report read these names."""

import lightning as L
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning.models import tiny_llama
from tar_lightning.safeguards import RandomMappingModule, RMUModule, SFTModule, UnlearnModule


def _build(kind: str, model, tok):
    sgd = lambda p: torch.optim.SGD(p, lr=1e-2)  # noqa: E731
    if kind == "random_mapping":
        return RandomMappingModule(model, tokenizer=tok, optimizer=sgd)
    if kind == "rmu":
        return RMUModule(model, tokenizer=tok, optimizer=sgd, layer=1)
    if kind == "sft":
        return SFTModule(model, tokenizer=tok, optimizer=sgd, streams={"retain": 1.0, "forget": 0.5})
    return UnlearnModule(model, tokenizer=tok, optimizer=sgd, forget_loss=kind)


@pytest.mark.parametrize(("kind", "keys"), [
    ("random_mapping", {"train/retain_ce", "train/random_mapping"}),
    ("rmu", {"train/rmu_forget", "train/rmu_retain"}),
    ("sft", {"train/ce_retain", "train/ce_forget"}),
    ("max_entropy", {"train/retain_ce", "train/max_entropy"}),
    ("min_posterior", {"train/retain_ce", "train/min_posterior"}),
])
def test_each_module_logs_its_parts_and_keeps_the_total_off_the_logger(kind, keys):
    torch.set_num_threads(1)
    model, tok = tiny_llama()
    module = _build(kind, model, tok)
    bundle = random_bundle(len(tok), module.stream_steps())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, DataLoader([bundle], batch_size=None))
    assert set(trainer.logged_metrics) == keys
    assert set(trainer.callback_metrics) == keys | {"loss"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in trainer.callback_metrics.values())
