"""A tiny, deterministic TAR fit that checkpoints every outer step and resumes from ``last.ckpt``.

Run by tests/test_resume.py as a subprocess. A run can SIGKILL itself at a chosen point (no cleanup of any
kind, exactly as a preempted job dies):

    forward:N     inside the N-th forward pass of the policy in this run (0-based): mid-inner-loop
                  (adversary steps), at a tamper-resistance evaluation, or at the retain loss
    save:S        inside the checkpoint save after outer step S, before any byte is written
    rename:S      after the checkpoint of step S is fully written to its temporary file, before the
                  atomic rename (a stale temporary file is left behind)

Each run is a forked child of this driver (imports are paid once; the child shares nothing else): first an
uninterrupted reference run, then one run per kill point (each resuming from the previous one's ``last.ckpt``),
then a final run to the end. Each finished run writes its complete end state (weights, optimizer, LR schedule,
data position, retain monitor, loop counters) to a ``.pt`` file; ``log.json`` says how every child ended.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from _child import in_child  # noqa: E402  (the script folder is on sys.path)
from lightning.pytorch.callbacks import ModelCheckpoint

from tar_lightning import AdversaryConfig, RetainLossMonitor, TARConfig, TARDataModule, TARModule
from tar_lightning.adversaries import LoRAConfig, SwitchConfig
from tar_lightning.checkpoint import tar_trainer_plugins
from tar_lightning.models import tiny_llama


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtSave(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            die()


def build(max_steps: int, ckpt_dir: Path):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model, tok = tiny_llama()
    config = TARConfig(
        inner_steps=4,
        tr_every=2,
        retain_representation=True,
        clip_grad_norm=1.0,
        seed=3,
        adversaries=[
            AdversaryConfig(name="adamw", data="forget", lr=(1e-3, 3e-3)),
            AdversaryConfig(name="switch", data="forget", lr=1e-3,
                            switch=SwitchConfig(retain_stream="retain_domain", beta=(6.0, 3.0))),
            AdversaryConfig(name="lora", data="forget", method="lora", lr=3e-3,
                            lora=LoRAConfig(rank=2, alpha=4.0, targets="all-linear")),
        ],
    )

    def optimizer(params):
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=1e-3, warmup_steps=2)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))

    module = TARModule(model, config, optimizer=optimizer, lr_scheduler=schedule, tokenizer=tok)
    synthetic = {
        "retain": {"path": "synthetic:retain", "synthetic": {"n": 24, "seed": 0}},
        "tr": {"path": "synthetic:forget", "synthetic": {"n": 24, "seed": 1}},
        "forget": {"path": "synthetic:forget", "synthetic": {"n": 48, "seed": 4}},
        "retain_domain": {"path": "synthetic:retain_domain", "synthetic": {"n": 48, "seed": 2}},
    }
    data = TARDataModule(streams=synthetic, seq_len=24, batch_size=2, seed=5, steps_per_epoch=3)
    monitor = RetainLossMonitor(baseline_steps=2)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1), monitor]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, deterministic=True, callbacks=callbacks,
        plugins=tar_trainer_plugins(), default_root_dir=ckpt_dir,
    )
    return trainer, module, data, monitor


def run(ckpt_dir: Path, out: Path, max_steps: int, kill_at_forward=None, kill_at_save=None,
        kill_before_rename=None) -> None:
    """One fit (resuming from ``ckpt_dir/last.ckpt`` when it exists), optionally SIGKILLed at a point."""
    trainer, module, data, monitor = build(max_steps, ckpt_dir)
    if kill_at_forward is not None:
        calls = [0]

        def hook(mod, inputs):
            if calls[0] == kill_at_forward:
                die()
            calls[0] += 1

        module.model.register_forward_pre_hook(hook)
    if kill_at_save is not None:
        trainer.callbacks.append(KillAtSave(kill_at_save))
    if kill_before_rename is not None:
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if str(dst).endswith(".ckpt") and trainer.global_step == kill_before_rename:
                die()
            return real_replace(src, dst, *a, **kw)

        os.replace = replace

    last = ckpt_dir / "last.ckpt"
    resumed_from = None
    if last.is_file():
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    torch.save(
        {
            "weights": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": scheduler.state_dict(),
            "global_step": trainer.global_step,
            "data": data.state_dict(),
            "monitor": monitor.state_dict(),
            "nonfinite": (module._nonfinite_in_a_row, module._nonfinite_total),
            "resumed_from": resumed_from,
        },
        out,
    )


def last_step(ckpt_dir: Path):
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="folder for checkpoints and results")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--kills", required=True,
                        help="comma-separated kill points, each forward:N, save:S or rename:S")
    args = parser.parse_args()
    work = Path(args.work)
    kinds = {"forward": "kill_at_forward", "save": "kill_at_save", "rename": "kill_before_rename"}
    log = []
    # the uninterrupted reference
    status = in_child(run, ckpt_dir=work / "reference", out=work / "reference.pt", max_steps=args.max_steps)
    log.append({"run": "reference", "status": status})
    # the interrupted run: killed at every point in turn, resumed from last.ckpt each time
    for i, spec in enumerate(args.kills.split(",")):
        kind, value = spec.split(":")
        before = last_step(work / "interrupted")
        status = in_child(run, ckpt_dir=work / "interrupted", out=work / f"interrupted_{i}.pt",
                          max_steps=args.max_steps, **{kinds[kind]: int(value)})
        log.append({"run": spec, "status": status, "resumed_from": before, "last_after": last_step(work / "interrupted"),
                    "temp_files": sorted(p.name for p in (work / "interrupted").glob("*.tmp"))})
    before = last_step(work / "interrupted")
    status = in_child(run, ckpt_dir=work / "interrupted", out=work / "interrupted.pt", max_steps=args.max_steps)
    log.append({"run": "final", "status": status, "resumed_from": before})
    (work / "log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
