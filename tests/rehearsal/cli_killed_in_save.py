"""``tar-lightning`` (the same ``main``), with one fault injected: the whole job is SIGKILLed inside a sharded save.

Used by tests/test_rehearsal.py like the console script (``python cli_killed_in_save.py fit --config ...``);
Lightning re-launches this same file for rank 1, so both ranks carry the hook. Environment:

    REHEARSAL_KILL_STEP=S    kill inside the save of ``last.ckpt`` that follows the periodic checkpoint of step S
    REHEARSAL_EVENTS=FILE    where to note the kill (one JSON line: step, the folder being written, its entries)

The kill lands in torch.distributed.checkpoint's ``finish`` on the coordinator (rank 0): every rank's shards
are written, the DCP ``.metadata`` and Lightning's ``meta.pt`` are not. ``os.killpg`` then SIGKILLs the process
group (both ranks, no cleanup of any kind), as a preempted or timed-out job dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path


def install(step: int, events: Path) -> None:
    from torch.distributed.checkpoint import filesystem

    real_finish = filesystem._FileSystemWriter.finish
    seen = {"periodic": None}

    def finish(self, metadata, results):
        folder = Path(os.fspath(self.path))
        match = re.search(r"step=(\d+)", folder.name)
        if match:  # the periodic checkpoint (or a temporary folder named after it)
            seen["periodic"] = int(match.group(1))
        elif seen["periodic"] == step:  # the last.ckpt save right after it
            with open(events, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"killed_at_step": step, "folder": str(folder),
                                     "entries": sorted(p.name for p in folder.iterdir())}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return real_finish(self, metadata, results)

    filesystem._FileSystemWriter.finish = finish


if __name__ == "__main__":
    install(int(os.environ["REHEARSAL_KILL_STEP"]), Path(os.environ["REHEARSAL_EVENTS"]))
    from tar_lightning.cli import main

    sys.exit(main())
