"""How ``TARModule`` builds its frozen reference model under FSDP2 (run by tests/test_startup_memory.py).

    python reference_sharding.py --devices 2 --precision bf16-mixed --reference none|source --out DIR

Lightning's ``ModelParallelStrategy`` on N CPU ranks (gloo), a tiny Llama, ``retain_representation``, ``fit`` with
``max_steps=0`` (start-up only). Each rank writes DIR/rank{r}.json with what its reference model is made of
(parameter types, placements, dtypes, local and full sizes), whether its gathered weights equal the starting
weights cast to the compute dtype, and whether its hidden states are bit-identical to those of the reference as it
used to be built (a deep copy of the starting model, cast to the policy's dtype, then sharded the same way).
"""

from __future__ import annotations

import argparse
import json
import os

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from tar_lightning import AdversaryConfig, TARConfig, TARModule
from tar_lightning.models import frozen_copy, tiny_llama
from tar_lightning.sharding import fully_shard_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--reference", choices=["none", "source"], default="none")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = tiny_llama(num_hidden_layers=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TARConfig(inner_steps=1, tr_every=1, retain_representation=True, adversaries=[AdversaryConfig(lr=1e-3)])
    reference = None
    if args.reference == "source":  # the same seeded weights, as a separate source loaded in the compute dtype
        reference = {"source": "tiny-llama", "overrides": {"num_hidden_layers": 3}}
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), tokenizer=tok,
                       reference_model=reference)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, precision=args.precision, max_steps=0, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([0]))

    ref = module.reference_model
    param_dtype, _ = module.sharding.policy_dtypes(trainer.precision)
    compute = param_dtype or next(module.model.parameters()).dtype
    params = []
    for name, p in ref.named_parameters():
        params.append({
            "name": name, "type": type(p).__name__, "dtype": str(p.dtype),
            "shard": all(pl.is_shard() for pl in getattr(p, "placements", ())) and hasattr(p, "placements"),
            "local": p.to_local().numel() if hasattr(p, "to_local") else p.numel(), "full": p.numel(),
            "equal_start": bool(torch.equal(p.full_tensor(), start[name].to(compute))) if hasattr(p, "full_tensor")
            else False,
            "requires_grad": p.requires_grad,
        })

    # The reference as it used to be built: a deep copy of the starting model, in the policy's dtype, sharded.
    old_model, _ = tiny_llama(num_hidden_layers=3)
    old = frozen_copy(old_model).to(dtype=next(module.model.parameters()).dtype)
    fully_shard_model(old, module._fsdp2_mesh(), module.sharding, trainer.precision, activation_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (2, 10), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        new_h = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        old_h = old(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    result = {
        "rank": trainer.global_rank,
        "compute_dtype": str(compute),
        "training": ref.training,
        "params": params,
        "hidden_equal": all(torch.equal(a, b) for a, b in zip(new_h, old_h, strict=True)),
        "hidden_dtype": str(new_h[-1].dtype),
        # a model that never runs a backward frees its root's unsharded parameters after the forward too
        "sharded_after_forward": all(hasattr(p, "to_local") for p in ref.parameters()),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
