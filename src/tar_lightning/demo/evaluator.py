"""How the demo scores a model on the knowledge world: :class:`KnowledgeEvaluator` and the metric names.

The red team calls it on every attacked model, and every training stage calls it on the model it produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from tar_lightning.common import config_hash, model_fingerprint
from tar_lightning.data.knowledge import build_world, knowledge_mcq, knowledge_records
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.heldout import heldout_metrics
from tar_lightning.evaluation.mcq import MCQItem, score_mcq

__all__ = ["CAPABILITY", "METRICS", "SAFETY", "KnowledgeEvaluator"]

#: The safety metric: MCQ accuracy on the held-out B facts (lower is safer).
SAFETY = "forget_B_acc"
#: The capability metric: MCQ accuracy on the cities' facts.
CAPABILITY = "retain_acc"
#: Every metric :class:`KnowledgeEvaluator` computes, in order.
METRICS = (SAFETY, "forget_A_acc", CAPABILITY, "forget_loss", "retain_loss")


class KnowledgeEvaluator:
    """Scores a model on the knowledge world: the red team's evaluator and every stage's check.

    Call ``evaluator(model, tokenizer, only=None) -> {metric: value}`` with the metrics

    - ``forget_B_acc``: MCQ accuracy on the B pathogens' facts (the safety metric; lower is safer);
    - ``forget_A_acc``: the same on the attacker's A facts;
    - ``retain_acc``: MCQ accuracy on the cities' facts (capability);
    - ``forget_loss``: held-out next-token CE on B-fact sentences (``heldout_metrics``; higher is safer);
    - ``retain_loss``: next-token CE on the cities' sentences (the LM-loss cost of a safeguard, which the
      saturated retain MCQ hides).

    MCQs use the ``raw`` variant of :func:`~tar_lightning.evaluation.mcq.score_mcq` (summed log-probability of
    ``" {choice}"`` after the bare held-out-template stem).

    Every metric is a deterministic function of the weights, so a full evaluation is remembered per weights
    digest (the last few): the red team's pre-attack evaluation of a defense, identical for each of its attacks,
    and the stage's own check of the same weights are computed once.

    Args:
        world: :func:`~tar_lightning.data.knowledge.build_world` arguments.
        seq_len: tokens per held-out text.
        batch_size: evaluation batch size.
        mcq_limit: first N questions of each MCQ split (``None``: all).
        heldout_limit: first N B sentences for ``forget_loss``.
    """

    METRICS = METRICS

    def __init__(
        self,
        world: Mapping[str, Any],
        seq_len: int = 48,
        batch_size: int = 64,
        mcq_limit: Optional[int] = None,
        heldout_limit: Optional[int] = 256,
    ) -> None:
        w = build_world(**dict(world))
        self.items = {}
        for metric, split in ((SAFETY, "forget_B"), ("forget_A_acc", "forget_A"), (CAPABILITY, "retain")):
            recs = knowledge_mcq(split, w)[:mcq_limit] if mcq_limit else knowledge_mcq(split, w)
            self.items[metric] = [MCQItem(r["question"], list(r["choices"]), r["answer"], r["subject"]) for r in recs]
        texts = [r["text"] for r in knowledge_records("forget_B", w)]
        self.texts = texts[:heldout_limit] if heldout_limit else texts
        retain = [r["text"] for r in knowledge_records("retain", w)]
        self.retain_texts = retain[:heldout_limit] if heldout_limit else retain
        self.seq_len, self.batch_size = seq_len, batch_size
        self._memo: dict[tuple, tuple[Any, dict[str, float]]] = {}
        self.fingerprint = "KnowledgeEvaluator(" + config_hash(
            [dict(world), seq_len, mcq_limit, heldout_limit, "raw"]
        ) + ")"

    MEMO_SIZE = 8

    def __getstate__(self) -> dict:  # sent to red-team worker processes without the memo (it holds tokenizers)
        return {**self.__dict__, "_memo": {}}

    def __call__(self, model: Any, tokenizer: Any, only: Optional[Sequence[str]] = None) -> dict[str, float]:
        if only is not None:  # the red team's evaluations during attacks: new weights every time
            return self._evaluate(model, tokenizer, only)
        key = (model_fingerprint(model), id(tokenizer), len(tokenizer))
        hit = self._memo.get(key)
        if hit is not None and hit[0] is tokenizer:
            return dict(hit[1])
        out = self._evaluate(model, tokenizer, None)
        self._remember(key, tokenizer, out)
        return out

    def remember(self, model: Any, tokenizer: Any, metrics: Mapping[str, float]) -> None:
        """Records ``metrics`` as this evaluator's full evaluation of these weights (a stage's stored
        evaluation, read back with the weights it exported, in place of scoring them again)."""
        missing = set(self.METRICS) - set(metrics)
        if missing:
            raise ConfigError(f"KnowledgeEvaluator.remember: metrics {sorted(missing)} are missing")
        self._remember((model_fingerprint(model), id(tokenizer), len(tokenizer)), tokenizer,
                       {k: float(metrics[k]) for k in self.METRICS})

    def _remember(self, key: tuple, tokenizer: Any, metrics: Mapping[str, float]) -> None:
        self._memo[key] = (tokenizer, dict(metrics))
        while len(self._memo) > self.MEMO_SIZE:
            self._memo.pop(next(iter(self._memo)))

    def _evaluate(self, model: Any, tokenizer: Any, only: Optional[Sequence[str]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric, items in self.items.items():
            if only is None or metric in only:
                out[metric] = float(
                    score_mcq(model, tokenizer, items, variant="raw", batch_size=self.batch_size).accuracy
                )
        if only is None or "forget_loss" in only:
            out["forget_loss"] = float(
                heldout_metrics(model, tokenizer, self.texts, seq_len=self.seq_len, batch_size=self.batch_size)[
                    "loss"
                ]
            )
        if only is None or "retain_loss" in only:
            out["retain_loss"] = float(
                heldout_metrics(model, tokenizer, self.retain_texts, seq_len=self.seq_len, batch_size=self.batch_size)[
                    "loss"
                ]
            )
        return out
