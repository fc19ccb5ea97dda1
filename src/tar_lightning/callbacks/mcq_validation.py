"""Multiple-choice accuracy as part of Lightning validation (forget MCQ, retain MCQ, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L

from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.mcq import MCQ_TASKS, load_mcq, load_task_items, score_mcq

__all__ = ["MCQValidation"]


class MCQValidation(L.Callback):
    """Scores multiple-choice sets at the end of every validation epoch and logs ``<prefix>/<name>/accuracy``.

    Questions are loaded once (at fit/validate start). With a TAR recipe whose data module has ``val_streams``
    (held-out forget text: loss and entropy), this adds the MCQ side of the paper's metrics, e.g. forget =
    WMDP-bio and retain = MMLU.

    Args:
        tasks: ``{name: task or file}`` — a task of :data:`tar_lightning.evaluation.mcq.MCQ_TASKS`
            (``wmdp_bio``, ``mmlu_college_biology``, ...) or an MCQ file/folder readable by ``load_mcq``.
        data_root: local folder of the standard task files (``TAR_LIGHTNING_DATA`` or the hub when unset).
        limit: questions per task (the first ``limit``).
        variant: ``letter`` (lm-eval's standard) or ``cloze``.
        chat_template: wrap the questions with the tokenizer's chat template.
        batch_size: questions per forward pass.
        prefix: namespace of the logged metrics.

    Raises:
        ConfigError: no tasks, or an unknown variant.
    """

    def __init__(
        self,
        tasks: dict[str, str],
        data_root: Optional[str] = None,
        limit: Optional[int] = None,
        variant: str = "letter",
        chat_template: bool = False,
        batch_size: int = 16,
        prefix: str = "val/mcq",
    ) -> None:
        if not tasks:
            raise ConfigError("MCQValidation.tasks is empty: give {name: task or file}, e.g. {forget: wmdp_bio}")
        if variant not in ("letter", "cloze"):
            raise ConfigError(f"MCQValidation.variant={variant!r}: expected 'letter' or 'cloze'")
        self.tasks = dict(tasks)
        self.data_root = data_root
        self.limit = limit
        self.variant = variant
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.prefix = prefix
        self._items: Optional[dict[str, list]] = None

    def _load(self) -> dict[str, list]:
        items = {}
        for name, task in self.tasks.items():
            if task in MCQ_TASKS:
                items[name] = load_task_items(task, self.data_root, self.limit)[1]
            elif Path(task).exists():
                items[name] = load_mcq(task, limit=self.limit)
            else:
                raise ConfigError(
                    f"MCQValidation.tasks[{name!r}]={task!r} is neither a known task ({len(MCQ_TASKS)} known, e.g. "
                    "wmdp_bio, mmlu) nor an existing file or folder"
                )
        return items

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._items is None:
            self._items = self._load()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._items is None:
            return
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("MCQValidation needs the module's tokenizer (pl_module.tokenizer is None)")
        for name, items in self._items.items():
            result = score_mcq(
                pl_module.model, tokenizer, items, variant=self.variant, chat_template=self.chat_template,
                batch_size=self.batch_size,
            )
            pl_module.log(f"{self.prefix}/{name}/accuracy", result.accuracy, on_epoch=True, sync_dist=True)
