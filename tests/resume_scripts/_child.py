"""Shared by the resume scripts: run a function in a forked child and report how it ended."""

from __future__ import annotations

import os
import signal


def in_child(fn, **kwargs) -> str:
    """Run ``fn(**kwargs)`` in a forked process (imports are shared, nothing else is); how it ended."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fn(**kwargs)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal:{signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit:{os.WEXITSTATUS(status)}"
