"""RetainLossMonitor: baseline, ratio, warning, stopping, state; RandomMappingModule trains its objective."""

import json

import lightning as L
import pytest
import torch
from conftest import random_bundle
from torch.utils.data import DataLoader

from tar_lightning import ConfigError, RandomMappingModule, RetainLossMonitor
from tar_lightning.models import tiny_llama


class RisingRetainLoss(L.LightningModule):
    """Logs ``train/retain_loss`` = values[step] (a scripted retain-loss curve)."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.log("train/retain_loss", float(self.values[self.global_step]), on_step=True)
        return self.layer(batch).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def run(values, monitor, max_steps):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        log_every_n_steps=1,
    )
    trainer.fit(RisingRetainLoss(values), DataLoader(torch.ones(64, 2), batch_size=1))
    return trainer


def test_ratio_against_the_starting_value_and_warning():
    values = [2.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    monitor = RetainLossMonitor(baseline_steps=2, ema_decay=0.0, warn_ratio=1.5)
    with pytest.warns(UserWarning, match=r"2\.00x its starting value 2\.0000"):
        trainer = run(values, monitor, max_steps=len(values))
    assert monitor.baseline == 2.0
    assert monitor.ratio == pytest.approx(2.0)
    assert trainer.callback_metrics["retain_monitor/ratio"] == pytest.approx(2.0)
    assert trainer.global_step == len(values)  # no stop_ratio: training runs to the end


def test_ema_smooths_the_watched_value():
    values = [1.0, 3.0, 3.0]
    monitor = RetainLossMonitor(baseline_steps=1, ema_decay=0.5, warn_ratio=100.0)
    run(values, monitor, max_steps=3)
    # ema: 1.0 -> 0.5*1 + 0.5*3 = 2.0 -> 0.5*2 + 0.5*3 = 2.5; baseline 1.0
    assert monitor.ema == pytest.approx(2.5)
    assert monitor.ratio == pytest.approx(2.5)


def test_stops_training_with_a_clear_message():
    values = [1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    monitor = RetainLossMonitor(baseline_steps=3, ema_decay=0.0, warn_ratio=2.0, stop_ratio=4.0)
    with pytest.warns(UserWarning, match="stop_ratio=4.0"):
        trainer = run(values, monitor, max_steps=len(values))
    assert trainer.global_step == 4  # stopped at the end of the first step past the threshold
    assert "stopped training at step" in monitor.stop_reason
    assert "5.00x its starting value 1.0000" in monitor.stop_reason


def test_state_round_trip():
    monitor = RetainLossMonitor(baseline_steps=2)
    monitor.baseline_values, monitor.ema, monitor.warned = [1.0, 2.0], 1.7, True
    other = RetainLossMonitor(baseline_steps=2)
    other.load_state_dict(monitor.state_dict())
    assert (other.baseline, other.ema, other.warned) == (1.5, 1.7, True)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"baseline_steps": 0}, "baseline_steps"), ({"ema_decay": 1.0}, "ema_decay"), ({"stop_ratio": -1}, "stop_ratio")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RetainLossMonitor(**kwargs)


def test_random_mapping_module_lowers_its_objective():
    model, tok = tiny_llama()
    module = RandomMappingModule(model, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), tokenizer=tok)
    batches = [random_bundle(len(tok), module.stream_steps(), batch=4, length=16, seed=0)] * 30
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    from tar_lightning.losses import random_mapping_loss

    def rm_value():
        f = {k: v[0] for k, v in batches[0]["forget"].items()}
        with torch.no_grad():
            out = module.model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], output_hidden_states=True)
        return random_mapping_loss(out.hidden_states, f["input_ids"], module.table, f["attention_mask"]).item()

    before = rm_value()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 30
    module.model.eval()
    after = rm_value()
    assert after < before - 0.1, (before, after)
    # the table is fixed: the same seed gives the same table in a new module
    again = RandomMappingModule(tiny_llama()[0], tokenizer=tok)
    assert torch.equal(again.table, module.table)


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.shared_data("wmdp/wmdp-bio-questions.json")
def test_mcq_validation_inside_tar_validation(tmp_path):
    from tar_lightning import AdversaryConfig, DataSource, TARConfig, TARDataModule, TARModule
    from tar_lightning.callbacks import MCQValidation
    from tar_lightning.evaluation.mcq import load_mcq

    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(lr=1e-3)])
    module = TARModule("tiny-llama", cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    forget = {"path": "synthetic:forget", "synthetic": {"n": 64, "seed": 1}}
    data = TARDataModule(
        streams={"retain": DataSource("synthetic:retain", synthetic={"n": 64}),
                 "forget": DataSource(**forget, select="0:80%"), "tr": DataSource(**forget, select="80%:")},
        val_streams={"tr_heldout": DataSource(**forget, select="80%:", limit=8)},
        seq_len=48, batch_size=2,
    )
    wmdp = {"forget": str(SHARED / "wmdp" / "wmdp-bio-questions.json")}
    probes = [MCQValidation(tasks=wmdp, limit=24),
              MCQValidation(tasks=wmdp, limit=24, variant="cloze", prefix="val/mcq_cloze")]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=probes, default_root_dir=tmp_path)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert "val/tr_heldout/loss" in metrics and "val/tr_heldout/entropy" in metrics
    # The accuracies recomputed by hand from the raw JSON: lm-eval's prompts, one plain forward per choice, the
    # summed log-probability of the continuation tokens, the first maximum wins (no batching, sorting or sharing).
    # This tiny model answers "D" to every letter prompt, so the cloze variant (whose choices are the answer texts)
    # is what makes the comparison sensitive to the scoring: its predictions vary from question to question.
    raw = json.loads((SHARED / "wmdp" / "wmdp-bio-questions.json").read_text())[:24]
    subject = load_mcq(SHARED / "wmdp" / "wmdp-bio-questions.json", limit=1)[0].subject  # "" for a bare file
    about = f" about {subject}" if subject else ""
    model, tok = module.model.eval(), module.tokenizer

    def hand_predictions(variant: str) -> list[int]:
        preds = []
        for record in raw:
            if variant == "letter":
                options = "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(record["choices"]))
                context = (f"The following are multiple choice questions (with answers){about}.\n\n"
                           f"{record['question'].strip()}{options}\nAnswer:")
                conts = [f" {'ABCD'[i]}" for i in range(len(record["choices"]))]
            else:
                context = f"The following are questions (with answers){about}.\n\nQuestion: {record['question'].strip()}\nAnswer:"
                conts = [f" {c}" for c in record["choices"]]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            scores = []
            for cont in conts:
                ids = torch.tensor([tok(context + cont, add_special_tokens=False)["input_ids"]])
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n_ctx, ids.shape[1])))
            preds.append(scores.index(max(scores)))
        return preds

    answers = [r["answer"] for r in raw]
    for variant, key in (("letter", "val/mcq/forget/accuracy"), ("cloze", "val/mcq_cloze/forget/accuracy")):
        preds = hand_predictions(variant)
        expected = sum(p == a for p, a in zip(preds, answers, strict=True)) / len(raw)
        assert float(metrics[key]) == pytest.approx(expected, abs=1e-6), variant
    assert len(set(preds)) > 1  # the cloze predictions differ between questions (a real check of the scoring)


def test_mcq_validation_bad_task_is_a_clear_error():
    from tar_lightning.callbacks import MCQValidation

    with pytest.raises(ConfigError, match="no_such_task"):
        MCQValidation(tasks={"forget": "no_such_task"})._load()
    with pytest.raises(ConfigError, match="variant"):
        MCQValidation(tasks={"forget": "wmdp_bio"}, variant="logits")
