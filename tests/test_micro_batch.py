"""Micro-batched attack steps (``micro_batch_size``): the same update as the whole batch, in smaller passes.

The reference is written here, independently of the library's loss: the next-token log-likelihood gathered by
hand, averaged over every labelled position of the whole batch, one backward, one plain SGD update.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tar_lightning import AdversaryConfig, ConfigError
from tar_lightning.adversaries import AdversaryRun
from tar_lightning.evaluation.redteam_cli import redteam_main
from tar_lightning.models import tiny_llama

LR = 0.5


def _batch(vocab: int) -> dict:
    """5 rows with very different numbers of labelled positions, so a row mean and a token mean disagree."""
    ids = torch.randint(3, vocab, (5, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :9] = -100  # 3 labelled next-token positions (targets 9-11)
    labels[2, :] = -100  # none
    labels[3, 6:] = -100  # 5
    labels[4, ::2] = -100  # every other one
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _per_row_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL and count of labelled positions per row, by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(dim=1), keep.sum(dim=1)


def _sgd_reference(model, batch, row_mean: bool = False):
    model = copy.deepcopy(model)
    nll, count = _per_row_nll(model, batch)
    if row_mean:  # the wrong weighting: each micro-batch of 2 rows averaged, then the parts averaged
        parts = [nll[i : i + 2].sum() / count[i : i + 2].sum().clamp(min=1) for i in range(0, 5, 2)]
        loss = torch.stack(parts).mean()
    else:
        loss = nll.sum() / count.sum()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    return model, float(loss.detach())


def _training_rows(model) -> list:
    """A list that collects the rows of every forward of ``model`` that builds a graph (attack steps; evaluations
    run without autograd)."""
    rows = []
    model.register_forward_pre_hook(
        lambda m, args, kw: rows.append(kw["input_ids"].shape[0]) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    return rows


def _max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_micro_batched_step_equals_the_whole_batch_token_mean_sgd_update():
    model, tok = tiny_llama()
    batch = _batch(len(tok))
    adv = AdversaryConfig(name="sgd", optimizer="sgd", lr=LR, weight_decay=0.0)
    reference, ref_loss = _sgd_reference(model, batch)
    wrong, _ = _sgd_reference(model, batch, row_mean=True)
    assert _max_diff(reference, wrong) > 1e-3  # the batch tells the two weightings apart

    attacked = copy.deepcopy(model)
    rows = _training_rows(attacked)
    with AdversaryRun(attacked, adv, lr=LR, steps=1, micro_batch_size=2) as run:
        loss = run.step(batch)
    assert rows == [2, 2, 1]  # three passes, none larger than the micro-batch
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert _max_diff(attacked, reference) < 1e-5

    whole = copy.deepcopy(model)
    with AdversaryRun(whole, adv, lr=LR, steps=1) as run:
        whole_loss = run.step(batch)
    assert float(whole_loss) == pytest.approx(ref_loss, rel=1e-5)
    assert _max_diff(whole, reference) < 1e-5


@pytest.mark.parametrize("method", ["lora", "embedding"])
def test_micro_batching_changes_no_update_of_adapters_or_perturbations(method):
    model, tok = tiny_llama()
    batch = _batch(len(tok))
    extra = {"lora": {"rank": 4, "alpha": 8.0}} if method == "lora" else {}
    adv = AdversaryConfig(name=method, method=method, lr=1e-2, **extra)

    def attack(micro):
        m = copy.deepcopy(model)
        with AdversaryRun(m, adv, lr=1e-2, steps=3, seed=0, micro_batch_size=micro) as run:
            losses = [float(run.step(batch)) for _ in range(3)]
            trained = [p.detach().clone() for p in run.trainable]
        return losses, trained

    (loss_a, a), (loss_b, b) = attack(None), attack(3)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert loss_a[0] != pytest.approx(loss_a[-1], rel=1e-6)  # the attack moved something
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_micro_batch_size_bad_values_and_a_custom_loss_are_refused():
    model, _ = tiny_llama()
    adv = AdversaryConfig(name="a")
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ConfigError, match=r"adversary 'a': micro_batch_size must be an integer >= 1"):
            AdversaryRun(model, adv, lr=1e-3, steps=1, micro_batch_size=bad)
    with pytest.raises(ConfigError, match="next-token loss only"):
        AdversaryRun(model, adv, lr=1e-3, steps=1, micro_batch_size=2, loss_fn=lambda m, b: torch.zeros(()))


def test_redteam_cli_micro_batch_size_gives_the_same_runs_and_reuses_them(tmp_path, capsys):
    base = ["--model", "tiny", "--suite", "durability", "--attacks", "d04", "--scale", "0.3", "--max_steps", "2",
            "--seeds", "1", "--progress", "false"]
    assert redteam_main(base + ["--out", str(tmp_path / "whole")]) == 0
    assert redteam_main(base + ["--out", str(tmp_path / "micro"), "--micro_batch_size", "1"]) == 0
    whole = json.loads((tmp_path / "whole" / "runs" / "d04__seed0.json").read_text())
    micro = json.loads((tmp_path / "micro" / "runs" / "d04__seed0.json").read_text())
    assert whole["attack_settings"]["batch_size"] == 3  # so micro-batches of 1 split every step
    assert (whole["micro_batch_size"], micro["micro_batch_size"]) == (None, 1)
    assert micro["config_hash"] == whole["config_hash"]
    assert micro["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    for key in whole["after"]:
        assert micro["after"][key] == pytest.approx(whole["after"][key], rel=1e-4, abs=1e-6), key
    summary = json.loads((tmp_path / "micro" / "results.json").read_text())
    assert summary["summary"]["micro_batch_size"] == 1
    capsys.readouterr()
    # an execution setting: the finished run is reused without it
    assert redteam_main(base + ["--out", str(tmp_path / "micro")]) == 0
    assert "(0 computed)" in capsys.readouterr().out

    assert redteam_main(base + ["--out", str(tmp_path / "bad"), "--micro_batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert "micro_batch_size" in err and "0" in err


def test_redteam_attacks_run_in_micro_batches(tmp_path):
    from tar_lightning.evaluation.redteam import run_redteam

    model, tok = tiny_llama()
    rows = _training_rows(model)  # each run's fresh copy of the model keeps the hook
    common = dict(tokenizer=tok, attacks=["d04"], scale=0.3, max_steps=2, seeds=1, progress=False, report=False)
    run_redteam(model, "durability", out_dir=tmp_path / "whole", **common)
    assert rows == [3, 3]
    rows.clear()
    run_redteam(model, "durability", out_dir=tmp_path / "micro", micro_batch_size=2, **common)
    assert rows == [2, 1, 2, 1]


def test_micro_batching_names_a_batch_entry_it_cannot_split():
    model, tok = tiny_llama()
    batch = _batch(len(tok))
    with AdversaryRun(model, AdversaryConfig(name="a"), lr=1e-3, steps=2, micro_batch_size=2) as run:
        run.step({**batch, "attention_mask": None, "extra": "kept as is"})  # None and other entries pass through
        with pytest.raises(ConfigError, match=r"adversary 'a': .*'labels' is \(5,\), not a \[5, seq_len\] tensor"):
            run.step({**batch, "labels": batch["labels"][:, 0]})


def test_worker_processes_take_the_micro_batch_size(tmp_path):
    from tar_lightning.evaluation.redteam import run_redteam

    result = run_redteam("tiny", "durability", out_dir=tmp_path, attacks=["d04", "d05"], scale=0.3, max_steps=2,
                         seeds=1, devices=["cpu", "cpu"], micro_batch_size=1, progress=False, report=False)
    assert [r["micro_batch_size"] for r in result.runs] == [1, 1]
    assert {r["device"] for r in result.runs} == {"cpu"}


def test_tamper_probe_micro_batches_give_the_same_probe():
    import lightning as L
    from conftest import random_bundle
    from torch.utils.data import DataLoader

    from tar_lightning import TARConfig, TARModule
    from tar_lightning.callbacks.tamper_probe import TamperProbe

    model, tok = tiny_llama()
    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(lr=1e-3)])
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok)
    batch = random_bundle(len(tok), cfg.stream_steps(), batch=3, seed=0, pad_last=5)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    attack = {"name": "p", "data": "forget", "lr": 1e-2, "optimizer": "sgd", "weight_decay": 0.0}
    rows = _training_rows(module.model)  # the probe's deep copy of the model keeps the hook
    whole = TamperProbe(attack=attack, steps=2, eval_data="tr").probe(trainer, module, batch)
    assert rows == [3, 3]
    rows.clear()
    micro = TamperProbe(attack=attack, steps=2, eval_data="tr", micro_batch_size=1).probe(trainer, module, batch)
    assert rows == [1] * 6
    assert whole["forget_loss"] != pytest.approx(whole["forget_loss_before"], rel=1e-4)
    for key, value in whole.items():
        assert micro[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    with pytest.raises(ConfigError, match="TamperProbe.micro_batch_size must be an integer >= 1"):
        TamperProbe(micro_batch_size=0)
