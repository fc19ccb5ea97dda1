"""Our MCQ evaluator against lm-evaluation-harness itself, question by question.

lm-eval 0.4.13 (a test dependency) runs its OWN ``wmdp_bio`` and ``mmlu_high_school_biology`` task configurations
offline, with only the data source replaced by the local files (``run_lm_eval(data_root=...)``), on the same
questions our :func:`score_mcq` scores. Checked for every question:

- the document lm-eval read equals the one read here from the raw file with ``json`` / ``csv`` (so the local-data
  wiring, MMLU's CSV conversion included, hands lm-eval the true questions);
- lm-eval's context and continuation strings equal ours (``format_context`` / ``continuations``);
- the per-choice log-likelihoods agree within the tolerance stated below, predictions are identical, and lm-eval's
  per-question ``acc`` equals our ``correct``.

Settings: letter scoring without and with the chat template (lm-eval ``apply_chat_template``), and on the tiny
model also with a system prompt (lm-eval ``system_instruction``), on a tiny random model and on the real
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import SHARED_DATA

from tar_lightning.evaluation.lm_eval_adapter import run_lm_eval
from tar_lightning.evaluation.mcq import continuations, format_context, load_task_items, score_mcq
from tar_lightning.models import load_model, tiny_llama

lm_eval_tasks = pytest.importorskip("lm_eval.tasks", reason="lm-eval is a test dependency: pip install -e '.[dev]'")

pytestmark = [pytest.mark.slow, pytest.mark.shared_data("wmdp/wmdp-bio-questions.json", "mmlu/test")]

TASKS = {"wmdp_bio": "wmdp/wmdp-bio-questions.json", "mmlu_high_school_biology": "mmlu/test/high_school_biology_test.csv"}
SYSTEM = "You are a careful assistant. Answer with one letter."

# Log-likelihood tolerance (absolute, nats). Both sides run the same fp32 model; they differ only in how sequences
# are batched and padded, so the log-softmax of the same position is reduced in a different order. Observed
# worst differences: ~1e-6 on the tiny model, ~1.5e-5 on SmolLM2 (log-likelihoods of magnitude 1-20).
TOLERANCE = {"tiny": 1e-5, "smollm2": 1e-4}
QUESTIONS = {"tiny": 200, "smollm2": 8}  # per task; SmolLM2 costs ~1 s per question and side on 2 CPU cores


def _raw_docs(task: str, n: int) -> list[dict]:
    """The first ``n`` questions of a task, read from the raw file without our loaders."""
    file = SHARED_DATA / TASKS[task]
    if file.suffix == ".json":
        docs = json.loads(file.read_text(encoding="utf-8"))[:n]
        return [{"question": d["question"], "choices": list(d["choices"]), "answer": int(d["answer"])} for d in docs]
    with file.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
            for r in rows]


@pytest.fixture(scope="module")
def task_manager():
    return lm_eval_tasks.TaskManager()


@pytest.fixture(scope="module")
def models():
    tiny = tiny_llama()
    smol = load_model("smollm2-135m-instruct", dtype=torch.float32)
    for model, _ in (tiny, smol):
        model.eval()
    return {"tiny": tiny, "smollm2": smol}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


SETTINGS = [
    ("tiny", False, None),
    ("tiny", True, None),
    ("tiny", False, SYSTEM),
    ("tiny", True, SYSTEM),
    ("smollm2", False, None),
    ("smollm2", True, None),
]


@pytest.mark.parametrize(
    "which,chat,system", SETTINGS, ids=[f"{w}-{'chat' if c else 'plain'}{'-system' if s else ''}" for w, c, s in SETTINGS]
)
def test_scores_agree_with_lm_eval_question_by_question(models, task_manager, which, chat, system):
    model, tok = models[which]
    n = QUESTIONS[which]
    out = run_lm_eval(
        model, tok, list(TASKS), batch_size=8, limit=n, data_root=SHARED_DATA, log_samples=True,
        apply_chat_template=chat, system_instruction=system, task_manager=task_manager,
    )
    worst = 0.0
    for task in TASKS:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        raw = _raw_docs(task, n)
        assert len(samples) == len(raw) == n

        # 1. lm-eval read the true questions from the local files
        for s, doc in zip(samples, raw, strict=True):
            assert {k: s["doc"][k] for k in ("question", "choices", "answer")} == doc, (task, s["doc_id"])

        # 2. the same strings are scored
        _, items, _ = load_task_items(task, SHARED_DATA, limit=n)
        for s, item in zip(samples, items, strict=True):
            context = format_context(item, chat_template=chat, system_prompt=system, tokenizer=tok)
            pairs = [tuple(a) for a in s["arguments"]]
            assert pairs == [(context, c) for c in continuations(item, chat_template=chat)], (task, s["doc_id"])

        # 3. the same numbers come out
        ours = score_mcq(model, tok, items, chat_template=chat, system_prompt=system, batch_size=5)
        for s, rec in zip(samples, ours.records, strict=True):
            theirs = [ll for ll, _ in s["filtered_resps"]]
            assert len(theirs) == len(rec["scores"]) == 4
            diff = max(abs(a - b) for a, b in zip(theirs, rec["scores"], strict=True))
            worst = max(worst, diff)
            assert diff <= TOLERANCE[which], (task, s["doc_id"], theirs, rec["scores"])
            assert rec["pred"] == max(range(4), key=lambda i: (theirs[i], -i)), (task, s["doc_id"])
            assert float(rec["correct"]) == s["acc"], (task, s["doc_id"])
        assert ours.accuracy == pytest.approx(out["results"][task]["acc,none"], abs=1e-12)
        # not a degenerate comparison: the choices' scores differ within questions
        assert any(len({round(x, 4) for x in r["scores"]}) > 1 for r in ours.records)
    print(f"{which} chat={chat} system={system is not None}: worst |Δ log-likelihood| = {worst:.2e}")

