"""TAR under DDP or FSDP2 (gloo, CPU) vs one process: a standalone script, run as a subprocess by
tests/test_distributed.py and tests/test_fsdp2_core.py.

    python tar_ddp_equivalence.py --devices N --global-batch 4 --steps 3 --out DIR [--outer sgd|adamw|schedule_free]
        [--strategy ddp|fsdp2|tar_fsdp2] [--lora] [--pool N] [--validation [--mcq FILE]] [--stray-forward]

``--strategy fsdp2``: Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` (also
for N=1), TARModule shards every decoder layer with ``fully_shard``; the saved parameters are the full (gathered)
tensors, and each rank also checks that a snapshot/attack/restore cycle on its shards is bit-exact.
``tar_fsdp2``: the same with :class:`tar_lightning.strategy.FSDP2Strategy` (per-rank checkpoint state).
``--lora``: the SGD adversary becomes a LoRA one; ``--pool N``: persistent adversaries; ``--validation``: a
sanity check and a validation pass after every step (``--mcq``: with MCQValidation); DIR/info.rank{r}.json then
records the validation count, pool sizes and continuations.

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


class FromGlobalStep(torch.utils.data.Sampler):
    """Global batch s at outer step s: a resumed run continues where the checkpoint left off."""

    def __init__(self, trainer, n: int):
        self.trainer, self.n = trainer, n

    def __iter__(self):
        return iter(range(self.trainer.global_step, self.n))

    def __len__(self) -> int:
        return self.n


class Data(L.LightningDataModule):
    def __init__(self, batches: list, val: bool = False):
        super().__init__()
        self.batches = batches
        self.val = val

    def train_dataloader(self):
        ds = RankSlice(self.batches, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(ds, batch_size=None, sampler=FromGlobalStep(self.trainer, len(ds)))

    def val_dataloader(self):
        """With ``val``: held-out micro-batches {input_ids, attention_mask, labels} of shape [b, L] (a rank's rows)."""
        if not self.val:
            return []
        forget = [bundle["forget"] for bundle in self.batches]
        rows = [{k: v[0] for k, v in stream.items()} for stream in forget]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        b = rows[0]["input_ids"].shape[0] // world
        return DataLoader([{k: v[rank * b:(rank + 1) * b] for k, v in r.items()} for r in rows], batch_size=None)


class RecordNorms(L.Callback):
    def __init__(self):
        self.norms = []
        self.validations = 0
        self.pool_sizes = []
        self.pool_continued = []

    def on_validation_end(self, trainer, pl_module):
        self.validations += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))
        if pl_module.adversary_pool is not None:
            self.pool_sizes.append(len(pl_module.adversary_pool))
            self.pool_continued.append(float(trainer.callback_metrics["train/pool_continued"]))


class StrayForward(L.Callback):
    """A user callback that runs a no-grad forward of the model after each step (and does not reshard)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.model(input_ids=batch["retain"]["input_ids"][0], use_cache=False)


def full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 DTensor shard (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_restore_is_bit_exact(module: TARModule, stream: dict) -> None:
    """Attack the sharded weights with one SGD step (forward, FSDP backward, step), restore, compare bit for bit."""
    from torch.distributed.tensor import DTensor

    from tar_lightning.snapshot import ParameterSnapshot

    params = module.trainable_parameters()
    assert all(isinstance(p, DTensor) for p in params), "FSDP2 run without DTensor parameters"
    before = [full(p.detach()).clone() for p in params]
    snap = ParameterSnapshot(params)
    opt = torch.optim.SGD(params, lr=1.0)
    ids = stream["input_ids"][0]
    loss = module.model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert not snap.matches(), "the attack did not change the weights"
    snap.restore()
    assert snap.matches()
    after = [full(p.detach()) for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "restore is not bit-exact"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data-steps", type=int, default=None, help="global batches in the data (default: --steps)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--outer", choices=["sgd", "adamw", "schedule_free"], default="sgd")
    ap.add_argument("--strategy", choices=["ddp", "fsdp2", "tar_fsdp2"], default="ddp",
                    help="fsdp2: Lightning's ModelParallelStrategy; tar_fsdp2: tar_lightning.strategy.FSDP2Strategy")
    ap.add_argument("--representation", action="store_true", help="retain_representation (a reference model)")
    ap.add_argument("--checkpoint", action="store_true", help="also trainer.save_checkpoint(DIR/last.ckpt)")
    ap.add_argument("--param-dtype", default="auto", help="ShardingConfig.param_dtype (FSDP2 mixed precision)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="ShardingConfig.activation_checkpointing")
    ap.add_argument("--resume", default=None, help="fit(ckpt_path=...) from this checkpoint")
    ap.add_argument("--no-average", action="store_true", help="negative control: skip the gradient averaging")
    ap.add_argument("--validation", action="store_true",
                    help="sanity check + a validation pass after every training step (must not change training)")
    ap.add_argument("--mcq", default=None, help="with --validation: also MCQValidation on this MCQ file")
    ap.add_argument("--stray-forward", action="store_true", help="a callback's no-grad forward after every step")
    ap.add_argument("--lora", action="store_true", help="a LoRA adversary and a full-parameter one")
    ap.add_argument("--pool", type=int, default=0, help="TARConfig.persistent_pool (persistent adversaries)")
    args = ap.parse_args()
    if args.global_batch % args.devices:
        sys.exit("global batch must be divisible by the number of devices")

    if args.no_average:
        import tar_lightning.grad_sync as gs

        gs.average_gradients = lambda grads: None
    torch.manual_seed(0)
    model, tok = tiny_llama()
    adversaries = [
        AdversaryConfig(name="sgd", data="forget", optimizer="sgd", optimizer_kwargs={"momentum": 0.0},
                        lr=0.05, weight_decay=0.0),
        AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=1e-3),
    ]
    if args.lora:  # the SGD adversary becomes a LoRA one (adapters replicated, gradients averaged by hand)
        adversaries[0] = AdversaryConfig(name="lora", data="forget", method="lora", optimizer="adamw", lr=1e-2,
                                         lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]})
    pool = {}
    if args.pool:  # every outer step after the first continues a stored trajectory with probability 0.7
        pool = {"persistent_pool": args.pool, "persistent_probability": 0.7, "persistent_horizon": 64}
    cfg = TARConfig(
        inner_steps=2,
        tr_every=1,
        trajectories=2,
        tr_loss="max_entropy",
        clip_grad_norm=0.5,
        adversaries=adversaries,
        seed=7,
        retain_representation=args.representation,
        **pool,
    )
    if args.outer == "sgd":
        def outer(p):
            return torch.optim.SGD(p, lr=0.5)
    elif args.outer == "adamw":
        def outer(p):
            return torch.optim.AdamW(p, lr=1e-3)
    else:  # the library's default outer optimizer (train/eval modes switched around validation)
        from tar_lightning.base_module import schedule_free_adamw

        outer = schedule_free_adamw(lr=1e-3, warmup_steps=0)
    from tar_lightning.sharding import ShardingConfig

    sharding = ShardingConfig(param_dtype=args.param_dtype, activation_checkpointing=args.activation_checkpointing)
    module = TARModule(model, cfg, optimizer=outer, tokenizer=tok, sharding=sharding)
    forward_dtypes = set()
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, inputs: forward_dtypes.add(str(mod.weight.dtype)))
    data = Data(global_batches(len(tok), cfg.stream_steps(), args.data_steps or args.steps, args.global_batch,
                               length=12), val=args.validation)
    norms = RecordNorms()
    callbacks = [norms]
    if args.mcq:
        from tar_lightning.callbacks import MCQValidation

        callbacks.append(MCQValidation(tasks={"forget": args.mcq}, limit=4, batch_size=2))
    if args.stray_forward:
        callbacks.append(StrayForward())
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    elif args.strategy == "tar_fsdp2":
        from tar_lightning.strategy import FSDP2Strategy

        strategy = FSDP2Strategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        callbacks=callbacks,
        num_sanity_val_steps=1 if args.validation else 0,
        val_check_interval=1 if args.validation else None,
        limit_val_batches=2 if args.validation else None,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    rank = trainer.global_rank
    os.makedirs(args.out, exist_ok=True)
    state = {k: full(v).detach().clone() for k, v in module.model.state_dict().items()}
    if args.checkpoint:
        trainer.save_checkpoint(os.path.join(args.out, "last.ckpt"))
    if args.strategy in ("fsdp2", "tar_fsdp2"):
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(module.model, FSDPModule)
        assert module.reference_model is None or isinstance(module.reference_model, FSDPModule)
        check_restore_is_bit_exact(module, data.batches[0]["forget"])
    torch.save(state, os.path.join(args.out, f"params.rank{rank}.pt"))
    with open(os.path.join(args.out, f"norms.rank{rank}.json"), "w") as f:
        json.dump(norms.norms, f)
    from torch.distributed._composable import checkpoint

    info = {
        "forward_dtypes": sorted(forward_dtypes),
        "param_dtypes": sorted({str(p.dtype) for p in module.model.parameters()}),
        "activation_checkpointing": [checkpoint.state(layer) is not None for layer in model.model.layers],
        "global_step": trainer.global_step,
        "validations": norms.validations,
        "pool_sizes": norms.pool_sizes,
        "pool_continued": norms.pool_continued,
        "mcq_logged": sorted(k for k in trainer.callback_metrics if k.startswith("val/mcq")),
    }
    with open(os.path.join(args.out, f"info.rank{rank}.json"), "w") as f:
        json.dump(info, f)
    # Tear the process group down explicitly: gloo's threads aborting at interpreter exit ("terminate called
    # without an active exception") otherwise fail an already finished run now and then.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
