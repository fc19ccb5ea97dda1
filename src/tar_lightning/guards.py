"""The non-finite guard of TAR's outer step: skip an update that saw NaN/Inf, stop after too many in a row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from tar_lightning.common import is_int
from tar_lightning.errors import DataError, NonFiniteError
from tar_lightning.snapshot import local_tensor
from tar_lightning.strategy import data_parallel_world_size

__all__ = ["NonFiniteGuard"]

_CHECKED = ["retain loss", "adversary losses", "tamper-resistance losses", "outer gradient norm"]


class NonFiniteGuard:
    """Decides whether an outer step must be skipped because a loss or the outer gradient is NaN/Inf.

    Skipped steps are counted (``in_a_row``, ``total``; checkpointed through :meth:`state_dict`). Training stops
    with :class:`~tar_lightning.errors.NonFiniteError` after ``max_in_a_row`` skipped steps in a row.

    Args:
        max_in_a_row: ``TARConfig.max_nonfinite_in_a_row``.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def check(self, step: int, retain: Tensor, adv_losses: Tensor, tr_losses: Tensor, total_norm: Tensor) -> bool:
        """Whether outer step ``step`` saw a NaN/Inf on any rank (then it is counted and must be skipped).

        One host sync (the flags are reduced on the device first, then all-reduced over the ranks, so every rank
        takes the same decision). A skipped step is reported with a warning naming what was not finite.
        """
        with torch.no_grad():
            checks = torch.stack([retain.detach().float().sum(), adv_losses.sum(), tr_losses.sum(),
                                  local_tensor(total_norm).detach().float().to(adv_losses.device)])
            flag = (~torch.isfinite(checks)).any().float()
            if data_parallel_world_size() > 1:
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skipped = bool(flag.item())
        if not skipped:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        which = [n for n, ok in zip(_CHECKED, torch.isfinite(checks).tolist(), strict=True) if not ok]
        rank_zero_warn(
            f"TARModule: non-finite {', '.join(which) or 'values on another rank'} at outer step {step}: update "
            f"skipped, weights restored ({self.in_a_row} in a row, {self.total} in total)"
        )
        return True

    def stop_if_exhausted(self, step: int) -> None:
        """Raises :class:`~tar_lightning.errors.NonFiniteError` once ``max_in_a_row`` steps in a row were
        skipped."""
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"TAR training stopped at outer step {step}: {self.in_a_row} outer steps in a row had NaN/Inf "
                f"losses or gradients (max_nonfinite_in_a_row={self.max_in_a_row}); the weights are those before "
                "these steps. Lower the adversary or outer learning rates, or set clip_grad_norm"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = {key: state.get(key, 0) for key in ("in_a_row", "total")} if isinstance(state, Mapping) else None
        if counts is None or not all(is_int(v) and v >= 0 for v in counts.values()):
            raise DataError(
                f"checkpoint key 'tar_nonfinite': expected {{'in_a_row': int >= 0, 'total': int >= 0}}, got {state!r}"
            )
        self.in_a_row, self.total = counts["in_a_row"], counts["total"]
