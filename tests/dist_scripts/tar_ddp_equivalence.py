"""TAR under DDP (gloo, CPU) vs one process: a standalone script, run as a subprocess by tests/test_distributed.py.

    python tar_ddp_equivalence.py --devices N --global-batch 4 --steps 3 --out DIR [--outer sgd|adamw]

Each rank r of N trains on the rows [r*b, (r+1)*b) (b = global batch / N) of the same global batches (equal
length, no padding: the rank-averaged gradient then equals the one-process gradient up to float reduction order),
writes its final parameters to DIR/params.rank{r}.pt and the outer gradient norm it logged per step to
DIR/norms.rank{r}.json.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tar_lightning import AdversaryConfig, TARConfig, TARModule  # noqa: E402
from tar_lightning.models import tiny_llama  # noqa: E402

torch.set_num_threads(1)


def global_batches(vocab: int, steps: dict, n_outer: int, batch: int, length: int) -> list:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n_outer):
        bundle = {}
        for name, n in steps.items():
            ids = torch.randint(3, vocab, (n, batch, length), generator=g)
            bundle[name] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        out.append(bundle)
    return out


class RankSlice(Dataset):
    """Outer step s of this rank: rows [r*b, (r+1)*b) of global batch s."""

    def __init__(self, batches: list, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, s: int) -> dict:
        bundle = self.batches[s]
        b = next(iter(bundle.values()))["input_ids"].shape[1] // self.world
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return {name: {k: v[:, rows] for k, v in stream.items()} for name, stream in bundle.items()}


class Data(L.LightningDataModule):
    def __init__(self, batches: list):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        ds = RankSlice(self.batches, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(ds, batch_size=None, shuffle=False)


class RecordNorms(L.Callback):
    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--outer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--no-average", action="store_true", help="negative control: skip the gradient averaging")
    args = ap.parse_args()
    if args.global_batch % args.devices:
        sys.exit("global batch must be divisible by the number of devices")

    if args.no_average:
        import tar_lightning.tar_module as tm

        tm.average_gradients = lambda grads: None
    torch.manual_seed(0)
    model, tok = tiny_llama()
    cfg = TARConfig(
        inner_steps=2,
        tr_every=1,
        trajectories=2,
        tr_loss="max_entropy",
        clip_grad_norm=0.5,
        adversaries=[
            AdversaryConfig(name="sgd", data="forget", optimizer="sgd", optimizer_kwargs={"momentum": 0.0},
                            lr=0.05, weight_decay=0.0),
            AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=1e-3),
        ],
        seed=7,
    )
    if args.outer == "sgd":
        def outer(p):
            return torch.optim.SGD(p, lr=0.5)
    else:
        def outer(p):
            return torch.optim.AdamW(p, lr=1e-3)
    module = TARModule(model, cfg, optimizer=outer, tokenizer=tok)
    data = Data(global_batches(len(tok), cfg.stream_steps(), args.steps, args.global_batch, length=12))
    norms = RecordNorms()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        callbacks=[norms],
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(state, os.path.join(args.out, f"params.rank{rank}.pt"))
    with open(os.path.join(args.out, f"norms.rank{rank}.json"), "w") as f:
        json.dump(norms.norms, f)


if __name__ == "__main__":
    main()
