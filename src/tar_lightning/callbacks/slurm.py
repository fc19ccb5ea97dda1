"""``SlurmRequeue``: checkpoint and requeue on Slurm's warning signal, only at a safe point of a TAR outer step.

Slurm sends ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@480``: 480 s before the time limit, sized in
docs/SCALING.md) to the job's tasks.
Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves a checkpoint *inside the signal handler*,
i.e. wherever the main thread happens to be: in TAR that is usually the adversary's inner loop, so the
checkpoint would hold attacked weights. This callback instead:

1. installs a ``SIGUSR1`` handler that only sets a flag;
2. at every train-batch end (the outer step is done and the attacked weights are restored) lets all ranks agree
   on the flag (an "any" reduction: Slurm may have signalled only some ranks);
3. if set: saves a checkpoint with ``trainer.save_checkpoint`` to ``<dirpath>/<filename>`` (default: the first
   ``ModelCheckpoint``'s folder, ``last.ckpt``, which ``--ckpt_path last`` resumes from) and stops training;
4. at fit end (every other checkpoint write finished, all ranks past a barrier) rank 0 runs
   ``scontrol requeue $SLURM_JOB_ID``; Slurm then ends the job's tasks and queues the job again.

Outside Slurm (no ``SLURM_JOB_ID``) it saves and stops without requeueing (``kill -USR1 <pid>`` is then a way
to stop a run at the next outer-step boundary with a resumable checkpoint).

Every process of the run destroys the ``torch.distributed`` process group when it exits
(:func:`close_process_group`, registered with :mod:`atexit` at ``setup``): left to the interpreter's shutdown,
gloo's background threads are torn down in undefined order and a rank often aborts (``terminate called without an
active exception``, exit code 134), which fails the Slurm job after a run that went well.

Lightning's auto-requeue must be off (``trainer.plugins: SLURMEnvironment(auto_requeue=false)``, as in
``recipes/launch/*.yaml``); :meth:`setup` refuses a run where it is on. A signal arriving before ``setup`` (while
the model loads) still has the default action (the process ends; the job is not requeued).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from tar_lightning.errors import ConfigError

__all__ = ["SlurmRequeue", "close_process_group"]


def close_process_group() -> bool:
    """Destroys the default ``torch.distributed`` process group if one is initialized; returns whether it did.

    Local (no collective, no barrier), so it is safe on the error path and when other ranks already exited. Call
    it when the process is done with distributed work (``tar-lightning fit|validate`` calls it before
    returning); :class:`SlurmRequeue` also registers it with :mod:`atexit`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


_AT_EXIT_REGISTERED = False


def _close_process_group_at_exit() -> None:
    global _AT_EXIT_REGISTERED
    if not _AT_EXIT_REGISTERED:
        atexit.register(close_process_group)
        _AT_EXIT_REGISTERED = True


def _slurm_job_id() -> Optional[str]:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(Callback):
    """Checkpoint at the next outer-step boundary after ``SIGUSR1``, then requeue the Slurm job and stop.

    Args:
        dirpath: folder of the checkpoint (default: the first ``ModelCheckpoint``'s ``dirpath``, else
            ``<default_root_dir>/checkpoints``).
        filename: its file name; ``last.ckpt`` (default) is what ``--ckpt_path last`` finds when ``dirpath`` is
            a ``ModelCheckpoint``'s folder.
        requeue: run ``scontrol requeue`` under Slurm (``False``: only save and stop).
        signum: the signal, by name (``SIGUSR1``) or number; must match the sbatch ``--signal``.

    Raises:
        ConfigError: an unknown signal; Lightning's own Slurm auto-requeue enabled on the same run.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: str = "last.ckpt",
        requeue: bool = True,
        signum: Any = "SIGUSR1",
    ) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.requeue = requeue
        try:
            self.signum = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(int(signum))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"SlurmRequeue(signum={signum!r}): not a signal name or number (e.g. 'SIGUSR1')") from e
        self.flag = False
        self.saved_path: Optional[str] = None
        self.saved_step: Optional[int] = None
        self._previous: Any = None
        self._installed = False
        self._requeue_pending = False

    # -- signal ---------------------------------------------------------------------------------------------

    def _handler(self, signum, frame) -> None:  # only sets the flag: nothing else is safe mid-step
        self.flag = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            raise ConfigError(
                "SlurmRequeue with Lightning's own Slurm auto-requeue enabled: Lightning would save a checkpoint "
                "inside the signal handler, in the middle of TAR's inner loop (attacked weights); set "
                "trainer.plugins to SLURMEnvironment(auto_requeue=false) (see recipes/launch/fsdp2_8gpu.yaml)"
            )
        self.flag = False
        self._previous = signal.signal(self.signum, self._handler)
        # restart system calls the signal interrupts (a blocking read/write/collective must not fail with EINTR)
        signal.siginterrupt(self.signum, False)
        self._installed = True
        _close_process_group_at_exit()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    # -- the safe point -------------------------------------------------------------------------------------

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where the requeue checkpoint goes (see ``dirpath``/``filename``)."""
        dirpath = self.dirpath
        if dirpath is None:
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                    dirpath = cb.dirpath
                    break
        if dirpath is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return str(Path(dirpath) / self.filename)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # every rank takes part in the reduction every outer step (a few bytes; an outer step is seconds)
        if not trainer.strategy.reduce_boolean_decision(self.flag, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path, self.saved_step = path, trainer.global_step
        rank_zero_info(f"SlurmRequeue: {self.signum.name} received; saved {path} at global_step "
                       f"{trainer.global_step} (outer step done, weights restored)")
        self.flag = False
        self._requeue_pending = True
        trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Requeue last: `scontrol requeue` kills the job's tasks, so every checkpoint write of this run (ours,
        # ModelCheckpoint's at batch/epoch/train end, the shards of every rank) must be finished first.
        if not self._requeue_pending:
            return
        self._requeue_pending = False
        job = _slurm_job_id()
        if not (self.requeue and job is not None):
            rank_zero_info(f"SlurmRequeue: not requeueing (no Slurm job); resume with --ckpt_path {self.saved_path}")
            return
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if trainer.is_global_zero:
            # Said before the call: a successful `scontrol requeue` kills this process, often before a line
            # printed after it reaches the job's log.
            rank_zero_info(f"SlurmRequeue: requeueing Slurm job {job}; it resumes from {self.saved_path}")
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                rank_zero_warn(f"SlurmRequeue: 'scontrol requeue {job}' failed ({result.returncode}): "
                               f"{result.stderr.strip()}; resubmit the job to resume from {self.saved_path}")
