"""Soak: 200 tiny TAR outer steps (full, LoRA and retain→forget adversaries) do not leak memory.

Every 10 steps the process RSS, the number of live torch tensors and the number of live Python objects are
sampled. After a warm-up of 50 steps (allocator pools, lazily built kernels, Lightning's loggers) the RSS may
not grow by more than 5 %, and the tensor count must not grow at all: inner optimizers, LoRA adapters,
snapshots and gradient buffers are freed at the end of every outer step.
"""

import gc
import os

import lightning as L
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader, Dataset

from tar_lightning import AdversaryConfig, TARConfig, TARModule
from tar_lightning.adversaries import LoRAConfig, SwitchConfig
from tar_lightning.models import tiny_llama

STEPS, EVERY, WARMUP = 200, 10, 50


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class Bundles(Dataset):
    """A fresh random TAR batch per outer step, built on demand (the data itself holds no memory)."""

    def __init__(self, vocab, steps):
        self.vocab, self.steps = vocab, steps

    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        return random_bundle(self.vocab, self.steps, batch=2, length=10, seed=i)


class Sampler(L.Callback):
    def __init__(self):
        self.samples = []  # (global_step, rss, tensors, objects)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % EVERY == 0:
            gc.collect()
            self.samples.append((trainer.global_step, rss_bytes(), live_tensors(), len(gc.get_objects())))


@pytest.mark.slow  # ~60 s of CPU: 200 outer steps with LoRA injection
def test_200_outer_steps_do_not_leak():
    torch.manual_seed(0)
    model, tok = tiny_llama()
    n_params = sum(1 for _ in model.parameters())
    modules_before = sorted(n for n, _ in model.named_modules())
    cfg = TARConfig(
        inner_steps=2, tr_every=1, retain_representation=True, clip_grad_norm=1.0,
        adversaries=[
            AdversaryConfig(name="full", lr=1e-3),
            AdversaryConfig(name="lora", method="lora", lr=3e-3, lora=LoRAConfig(rank=2, alpha=4.0)),
            AdversaryConfig(name="switch", lr=1e-3, switch=SwitchConfig(retain_stream="retain_domain")),
        ],
    )
    module = TARModule(model, cfg, tokenizer=tok)  # default outer optimizer: schedule-free AdamW
    sampler = Sampler()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[sampler])
    trainer.fit(module, DataLoader(Bundles(len(tok), cfg.stream_steps()), batch_size=None))

    assert trainer.global_step == STEPS
    steps = [s for s, *_ in sampler.samples]
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    after = [(s, rss, t, o) for s, rss, t, o in sampler.samples if s >= WARMUP]
    _, rss0, tensors0, objects0 = after[0]
    peak_rss = max(rss for _, rss, _, _ in after)
    growth = (peak_rss - rss0) / rss0
    print(f"soak: RSS {rss0 / 2**20:.1f} MiB at step {WARMUP}, peak {peak_rss / 2**20:.1f} MiB after "
          f"({100 * growth:+.2f} %); live tensors {[t for _, _, t, _ in after]}; "
          f"Python objects {objects0} -> {after[-1][3]}")
    assert growth <= 0.05, sampler.samples
    assert max(t for _, _, t, _ in after) <= tensors0, sampler.samples
    # the adapters were removed and nothing was added to the model
    assert sum(1 for _ in module.model.parameters()) == n_params
    assert sorted(n for n, _ in module.model.named_modules()) == modules_before
    # all three adversaries ran (the sampling is a pure function of the step: check it drew each one)
    from tar_lightning.adversaries.config import sample_adversary
    from tar_lightning.tar_module import step_generator

    drawn = {sample_adversary(cfg.adversaries, step_generator(cfg.seed, s, 0)) for s in range(STEPS)}
    assert drawn == {0, 1, 2}
