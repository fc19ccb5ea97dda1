"""Periodic sharded checkpoints under FSDP2 (gloo, CPU), with an optional SIGKILL inside a save, and resume: a
standalone script, run as a subprocess by tests/test_checkpoint_safety.py.

    python checkpoint_safety.py --devices N --out DIR --steps 4 [--strategy tar|lightning]
        [--kill shards|swap --kill-at K] [--resume PATH|last]

A ``ModelCheckpoint`` saves every outer step (``save_top_k=1``, so the previous one is removed: rotation) and
``last.ckpt``, through the ``AtomicCheckpointIO`` plugin as the CLI does. ``--strategy tar`` is
``tar_lightning.strategy.FSDP2Strategy``, ``lightning`` Lightning's own ``ModelParallelStrategy`` (in-place saves).
Each rank puts ``rank*100 + global_step`` under ``RANK_LOCAL_KEY`` in every checkpoint and records what it gets
back on load.

``--kill shards``: rank 1 SIGKILLs itself right after writing its shard file in the K-th save (the other ranks are
then killed by Lightning's launcher). ``--kill swap``: rank 0 SIGKILLs itself right after the K-th rename of
``FSDP2Strategy``'s swap. The final (gathered) parameters go to DIR/params.rank{r}.pt.
"""

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from tar_ddp_equivalence import Data, full, global_batches  # noqa: E402

from tar_lightning import AdversaryConfig, TARConfig, TARModule  # noqa: E402
from tar_lightning.checkpoint import AtomicCheckpointIO  # noqa: E402
from tar_lightning.models import tiny_llama  # noqa: E402
from tar_lightning.strategy import RANK_LOCAL_KEY  # noqa: E402

torch.set_num_threads(1)


class RankLocal(L.Callback):
    """Puts per-rank state into every checkpoint and records what a resume hands back."""

    def __init__(self, out: str):
        self.out = out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[RANK_LOCAL_KEY] = {"value": torch.tensor([trainer.global_rank * 100 + trainer.global_step])}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        got = checkpoint.get(RANK_LOCAL_KEY)
        with open(os.path.join(self.out, f"rank_local.rank{trainer.global_rank}.json"), "w") as f:
            json.dump(None if got is None else int(got["value"].item()), f)


def arm_kill(kind: str, at: int) -> None:
    """SIGKILL this process inside the ``at``-th save: after a shard write (rank 1) or a swap rename (rank 0)."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    calls = {"n": 0}
    if kind == "shards" and rank == 1:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        original = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            fut = original(self, plan, planner)
            fut.wait()
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fut

        FileSystemWriter.write_data = write_data
    elif kind == "swap" and rank == 0:
        import tar_lightning.strategy as strategy_module

        original_rename = strategy_module._rename

        def rename(src, dst):
            original_rename(src, dst)
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGKILL)

        strategy_module._rename = rename


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", choices=["tar", "lightning"], default="tar")
    ap.add_argument("--kill", choices=["shards", "swap"], default=None)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--resume", default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.kill:
        arm_kill(args.kill, args.kill_at)

    torch.manual_seed(0)
    model, tok = tiny_llama()
    cfg = TARConfig(
        inner_steps=1, tr_every=1, trajectories=1, tr_loss="max_entropy", clip_grad_norm=0.5, seed=7,
        adversaries=[AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=1e-3)],
    )
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    data = Data(global_batches(len(tok), cfg.stream_steps(), args.steps, 2 * args.devices, length=8))
    if args.strategy == "tar":
        from tar_lightning.strategy import FSDP2Strategy as Strategy
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy as Strategy
    checkpoints = ModelCheckpoint(dirpath=os.path.join(args.out, "ckpts"), every_n_train_steps=1, save_top_k=1,
                                  save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=Strategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        plugins=[AtomicCheckpointIO()],
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[checkpoints, RankLocal(args.out)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    state = {k: full(v).detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(state, os.path.join(args.out, f"params.rank{trainer.global_rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
