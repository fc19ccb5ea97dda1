"""One TAR outer step on padded, prompt-masked, uneven-length data under DDP or FSDP2 (gloo, CPU), or on one
process: a standalone script run as a subprocess by tests/test_distributed.py.

    python tar_uneven_tokens.py --devices N --strategy ddp|fsdp2 --out DIR

The data (``uneven_batches``) gives rank 0 short rows and rank 1 long ones, right-padded, with the first tokens of
every row masked out of the labels (a prompt), so the two ranks hold different numbers of labelled tokens. The
config is small enough to recompute by hand in the test: one trajectory of K=2 SGD adversary steps on ``forget``,
the negative-CE TR loss after each (uniform weights), a CE retain loss, no clipping, one SGD outer step. Each
rank writes its final full parameters to ``DIR/params.rank{r}.pt``.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from tar_ddp_equivalence import Data, full  # noqa: E402

from tar_lightning import AdversaryConfig, TARConfig, TARModule  # noqa: E402
from tar_lightning.models import tiny_llama  # noqa: E402

torch.set_num_threads(1)

GLOBAL_BATCH = 4  # rows 0-1 go to rank 0, rows 2-3 to rank 1
LENGTH = 16
LENGTHS = (4, 6, 16, 13)  # tokens per row before padding: rank 0 short, rank 1 long
PROMPT = (1, 2, 3, 5)  # leading tokens of each row that carry no label
PAD = 0
ADV_LR, OUTER_LR, TR_WEIGHT = 0.05, 0.5, 2.0


def config() -> TARConfig:
    return TARConfig(
        inner_steps=2, tr_every=1, trajectories=1, tr_loss="neg_ce", tr_weight=TR_WEIGHT, retain_weight=1.0,
        weighting="uniform", clip_grad_norm=None, seed=3,
        adversaries=[AdversaryConfig(name="sgd", data="forget", optimizer="sgd",
                                     optimizer_kwargs={"momentum": 0.0}, lr=ADV_LR, weight_decay=0.0)],
    )


def uneven_batches(vocab: int, steps: dict) -> list:
    """One global batch: ``{stream: {input_ids, attention_mask, labels} [n, GLOBAL_BATCH, LENGTH]}``."""
    g = torch.Generator().manual_seed(4321)
    bundle = {}
    for name, n in sorted(steps.items()):
        ids = torch.randint(3, vocab, (n, GLOBAL_BATCH, LENGTH), generator=g)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (length, prompt) in enumerate(zip(LENGTHS, PROMPT, strict=True)):
            mask[:, row, :length] = 1
            labels[:, row, prompt:length] = ids[:, row, prompt:length]
        ids = ids.masked_fill(mask == 0, PAD)
        bundle[name] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return [bundle]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = tiny_llama()
    cfg = config()
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=OUTER_LR), tokenizer=tok)
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=Data(uneven_batches(len(tok), cfg.stream_steps())))
    state = {k: full(v).detach().clone() for k, v in module.model.state_dict().items()}
    os.makedirs(args.out, exist_ok=True)
    torch.save(state, os.path.join(args.out, f"params.rank{trainer.global_rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
