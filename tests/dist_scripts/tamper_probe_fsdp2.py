"""TamperProbe during a TAR fit, one process or FSDP2 on N gloo CPU processes: a standalone script, run as a
subprocess by tests/test_tamper_probe_fsdp2.py.

    python tamper_probe_fsdp2.py --devices N --steps 3 --out DIR [--strategy single|fsdp2] [--probe] [--mcq FILE]
                                 [--micro_batch_size M] [--probe_sgd]

The data, model and TAR configuration are those of tar_ddp_equivalence.py (rank r trains on rows [r*b, (r+1)*b) of
the same global batches of 4 rows, equal lengths). ``--probe`` adds two probes: ``probe/`` after every outer step
(full-parameter AdamW on the training batch's ``forget`` micro-batches, held-out loss on its ``tr`` rows, MCQ
scoring when ``--mcq`` is given) and ``probe_lora/`` every 2 steps (a LoRA attack on the same rows, evaluated on
a synthetic source: the same text on every rank); ``--micro_batch_size`` runs both probes' attack steps in passes
of at most M rows; ``--probe_sgd`` gives both probes plain SGD (no momentum, no weight decay) instead of AdamW,
whose steps hardly change when every gradient is scaled alike, so that a wrongly weighted gradient shows in the
metrics. The record also counts the grad-enabled forward passes of the fit by their number of rows. Each rank writes DIR/params.rank{r}.pt (full tensors) and
DIR/probe.rank{r}.json: the probe metrics that reached the loggers (with their step), the probes' histories, the
``probe``-prefixed entries of ``trainer.callback_metrics``, and what one more probe called directly after the fit
(model in eval mode) left behind.
"""

import argparse
import collections
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402
from tar_ddp_equivalence import Data, RankSlice, full, global_batches  # noqa: E402

from tar_lightning import AdversaryConfig, TARConfig, TARModule  # noqa: E402
from tar_lightning.callbacks.tamper_probe import TamperProbe  # noqa: E402
from tar_lightning.models import tiny_llama  # noqa: E402

torch.set_num_threads(1)


class Recorder(Logger):
    """Keeps every metric logged to it (on the rank it runs on)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


class LoraProbe(TamperProbe):
    """A second probe in the same trainer (Lightning allows one stateful callback per type and state key)."""


def direct_probe(trainer, module, probe, batch) -> dict:
    """One more probe after the fit, called directly with the model in eval mode: what it leaves behind."""
    from torch.distributed.tensor import DTensor

    module.model.eval()
    before = [full(p.detach()).clone() for p in module.model.parameters()]
    rng = torch.random.get_rng_state()
    metrics = probe.probe(trainer, module, batch)
    after = [full(p.detach()) for p in module.model.parameters()]
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    return {
        "metrics": sorted(metrics),
        "weights_untouched": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "rng_untouched": torch.equal(torch.random.get_rng_state(), rng),
        "eval_mode_kept": not module.model.training and not any(m.training for m in module.model.modules()),
        "grads_none": all(p.grad is None for p in module.model.parameters()),
        "all_sharded": all(isinstance(p, DTensor) and all(pl.is_shard() for pl in p.placements) for p in trainable),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", choices=["single", "fsdp2"], default="single")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--mcq", default=None, help="with --probe: the full-parameter probe also scores this MCQ file")
    ap.add_argument("--micro_batch_size", type=int, default=None, help="with --probe: the probes' micro_batch_size")
    ap.add_argument("--probe_sgd", action="store_true", help="with --probe: SGD (lr 0.1, no momentum) attacks")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = tiny_llama()
    adversaries = [
        AdversaryConfig(name="sgd", data="forget", optimizer="sgd", optimizer_kwargs={"momentum": 0.0},
                        lr=0.05, weight_decay=0.0),
        AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=1e-3),
    ]
    cfg = TARConfig(inner_steps=2, tr_every=1, trajectories=2, tr_loss="max_entropy", clip_grad_norm=0.5,
                    adversaries=adversaries, seed=7)
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    data = Data(global_batches(len(tok), cfg.stream_steps(), args.steps, 4, length=12))
    grad_rows: collections.Counter = collections.Counter()  # rows of each grad-enabled forward pass

    def count_rows(_module, inputs):
        if torch.is_grad_enabled():
            grad_rows[int(inputs[0].shape[0])] += 1

    model.get_input_embeddings().register_forward_pre_hook(count_rows)  # deep copies share the function
    sgd = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "optimizer_kwargs": {"momentum": 0.0}}
    probes = []
    if args.probe:
        probes = [
            TamperProbe(every_n_steps=1, attack={"name": "full", "data": "forget", "lr": 1e-2,
                                                 **(sgd if args.probe_sgd else {})}, steps=3,
                        eval_data="tr", eval_limit=8, mcq={"path": args.mcq, "limit": 4} if args.mcq else None,
                        eval_batch_size=2, seed=3, prefix="probe", micro_batch_size=args.micro_batch_size),
            LoraProbe(every_n_steps=2, attack={"name": "lora", "data": "forget", "method": "lora",
                                               "lora": {"rank": 2, "alpha": 4.0}, "lr": 1e-2,
                                               **(sgd if args.probe_sgd else {})},
                      steps=2, seq_len=16, eval_limit=4, eval_batch_size=2, prefix="probe_lora",
                      micro_batch_size=args.micro_batch_size,
                      eval_data="heldout",
                      sources={"heldout": {"path": "synthetic:forget", "synthetic": {"n": 8, "seed": 5}}}),
        ]
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "auto"
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=recorder,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        callbacks=probes,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    history = {p.prefix: [dict(h) for h in p.history] for p in probes}  # the fit's probes
    fit_rows = {str(k): v for k, v in sorted(grad_rows.items())}
    direct = direct_probe(trainer, module, probes[0], RankSlice(data.batches, rank, trainer.world_size)[0]) \
        if probes else {}
    os.makedirs(args.out, exist_ok=True)
    state = {k: full(v).detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(state, os.path.join(args.out, f"params.rank{rank}.pt"))
    record = {
        "global_step": trainer.global_step,
        "logged": [{k: v for k, v in row.items() if k == "step" or k.startswith("probe")} for row in recorder.rows
                   if any(k.startswith("probe") for k in row)],
        "history": history,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("probe")},
        "grads": sum(p.grad is not None for p in module.model.parameters()),
        "lora_modules": sum("lora" in n for n, _ in module.model.named_modules()),
        "direct": direct,
        "grad_rows": fit_rows,
    }
    with open(os.path.join(args.out, f"probe.rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
