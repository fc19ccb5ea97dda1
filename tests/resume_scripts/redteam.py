"""A tiny red team (2 durability attacks × 2 seeds on a random tiny Llama), SIGKILLed mid-attack and rerun.

Run by tests/test_resume.py as a subprocess. Every red team is a forked child of this driver: first an
uninterrupted reference in ``WORK/reference``, then one child per kill point in ``WORK/interrupted`` (each rerun
of the same red team resumes the finished runs), then a final rerun to the end. A kill point N SIGKILLs the child
inside the N-th evaluation (0-based, counted in that child) — evaluations happen before, during and after each
attack, so any N that is not a run's first or last evaluation lands mid-attack. ``log.json`` records how each
child ended and which run files existed afterwards.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
from pathlib import Path

import torch
from _child import in_child  # noqa: E402  (the script folder is on sys.path)

from tar_lightning.evaluation.redteam import run_redteam
from tar_lightning.evaluation.suite import load_suite
from tar_lightning.losses import causal_lm_loss
from tar_lightning.models import tiny_llama

REPO = Path(__file__).resolve().parents[2]


class Evaluator:
    """Cheap metrics on fixed random tokens; SIGKILLs its own process at evaluation ``kill_at``."""

    def __init__(self, kill_at=None):
        g = torch.Generator().manual_seed(0)
        self.ids = {"forget_loss": torch.randint(3, 800, (2, 12), generator=g),
                    "retain_loss": torch.randint(3, 800, (2, 12), generator=g)}
        self.kill_at = kill_at
        self.calls = 0

    def __call__(self, model, tokenizer):
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls += 1
        out = {name: float(causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids))
               for name, ids in self.ids.items()}
        out["weight_norm"] = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
        return out


def redteam(out: Path, kill_at=None) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    suite = load_suite(REPO / "recipes" / "redteam" / "durability.yaml")
    suite = copy.deepcopy(suite)
    suite.seq_len = 32
    suite = suite.select(["d04", "d05"]).scaled(0.2, max_batch_size=2)
    model, tok = tiny_llama()
    evaluator = Evaluator(kill_at)
    run_redteam(model, suite, tokenizer=tok, out_dir=out, seeds=2, evaluator=evaluator, progress=False,
                report=False)
    (out / "evaluations.txt").write_text(str(evaluator.calls))


def finished(out: Path) -> list[str]:
    runs = out / "runs"
    return sorted(p.stem for p in runs.glob("*.json")) if runs.is_dir() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--kills", required=True, help="comma-separated evaluation indices to die in")
    args = parser.parse_args()
    work = Path(args.work)
    log = [{"run": "reference", "status": in_child(redteam, out=work / "reference")}]
    for spec in args.kills.split(","):
        before = finished(work / "interrupted")
        status = in_child(redteam, out=work / "interrupted", kill_at=int(spec))
        log.append({"run": f"kill:{spec}", "status": status, "finished_before": before,
                    "finished_after": finished(work / "interrupted")})
    before = finished(work / "interrupted")
    log.append({"run": "final", "status": in_child(redteam, out=work / "interrupted"), "finished_before": before})
    (work / "log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
