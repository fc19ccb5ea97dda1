"""Progress of long evaluation stages, readable both on a terminal and in a log file.

:func:`progress` is the one way ``evaluate`` and the red team show progress. On a terminal it is a tqdm bar
(nested bars stack with ``position``). Anywhere else (stderr redirected to a file, a pipe, a Slurm log) tqdm's
carriage returns and cursor-movement escape codes would fill the file with redrawn bars, so a plain line is
written instead, at the start and each time another tenth of the total is done (for an unknown total: after 1,
2, 4, 8, ... updates), and one at the end, e.g.::

    wmdp_bio letter: 10/25 batches (40%) 12.3 s elapsed, ~18.5 s left

Nothing here runs unless asked: callers pass ``enabled=False`` (the default of the scoring functions) inside
training loops and other places that keep their own logs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Optional

from tqdm import tqdm
from transformers.utils import logging as hf_logging

__all__ = ["PlainProgress", "progress", "quiet_hf_progress"]


class PlainProgress:
    """A progress counter that writes plain lines (no ``\\r``, no escape codes): tqdm's ``update``/``close``
    interface and iteration, for output that is not a terminal.

    Args:
        iterable: what to iterate over (optional: without it, call :meth:`update`).
        total: the number of updates that make 100 %; ``None`` when unknown.
        desc: the label that starts every line.
        unit: what one update counts, in the singular ("batch", "step").
        file: where lines go (default: ``sys.stderr`` at construction).
        percent_step: write a line each time this many more percent are done.
    """

    def __init__(
        self,
        iterable: Optional[Iterable[Any]] = None,
        *,
        total: Optional[int] = None,
        desc: str = "",
        unit: str = "it",
        file: Optional[IO[str]] = None,
        percent_step: int = 10,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.file = sys.stderr if file is None else file
        self.percent_step = max(1, int(percent_step))
        self.n = 0
        self._start = time.perf_counter()
        self._next_line = 1  # unknown total: the count that triggers the next line (1, 2, 4, ...)
        self._last_written = -1
        self._closed = False
        self._write()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress: nothing to iterate over (built without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _bucket(self, n: int) -> int:
        return (100 * n // self.total) // self.percent_step if self.total else 0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done; writes a line when another ``percent_step`` percent is reached."""
        before, self.n = self.n, self.n + n
        if self.total:
            if self._bucket(self.n) > self._bucket(before):
                self._write()
        elif self.n >= self._next_line:
            while self._next_line <= self.n:
                self._next_line *= 2
            self._write()

    def close(self) -> None:
        """Write the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._last_written != self.n:
            self._write()

    def _write(self) -> None:
        elapsed = time.perf_counter() - self._start
        count = self.total if self.total else self.n  # "1/1 step", "1 step"; "0/3 steps", "2 steps"
        units = self.unit if count == 1 else self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")
        if self.total:
            text = f"{self.n}/{self.total} {units} ({100 * self.n // self.total}%)"
        else:
            text = f"{self.n} {units}"
        if self.n:
            text += f" {elapsed:.1f} s elapsed"
            if self.total and self.n < self.total:
                text += f", ~{elapsed / self.n * (self.total - self.n):.1f} s left"
        prefix = f"{self.desc}: " if self.desc else ""
        self.file.write(f"{prefix}{text}\n")
        self.file.flush()
        self._last_written = self.n


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(
    iterable: Optional[Iterable[Any]] = None,
    *,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    position: int = 0,
    leave: bool = True,
    file: Optional[IO[str]] = None,
) -> Any:
    """Progress over ``iterable`` (or, without one, an object to ``update(n)`` and ``close()``), on stderr.

    A tqdm bar when ``file`` (default ``sys.stderr``) is a terminal, else a :class:`PlainProgress` writing plain
    lines; with ``enabled=False``, ``iterable`` itself (``None`` without one: callers test for it).

    Args:
        iterable: what to iterate over.
        total: the true number of items/updates (``len(iterable)`` is not guessed: pass it); ``None`` if unknown.
        desc: label of the bar/lines.
        unit: what one item counts ("batch", "step", "run").
        enabled: ``False`` shows nothing.
        position: the line of a nested bar on a terminal (0 outermost).
        leave: keep the finished bar on a terminal.
        file: the stream (default ``sys.stderr``, looked up at the call).
    """
    if not enabled:
        return iterable
    stream = sys.stderr if file is None else file
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, position=position, leave=leave, file=stream,
                    dynamic_ncols=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, file=stream)


@contextlib.contextmanager
def quiet_hf_progress(unless_terminal: bool = False) -> Iterator[None]:
    """Silences transformers' weight loading/writing progress bars inside the block.

    Args:
        unless_terminal: silence them only when stderr is not a terminal (where their escape codes would end up
            in a log file); on a terminal they stay.
    """
    if unless_terminal and _is_terminal(sys.stderr):
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
