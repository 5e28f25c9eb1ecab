"""Progress of a long step: a tqdm bar on a terminal, plain lines without one.

In a Slurm log or a file, tqdm's carriage returns pile up into one enormous line. Without a
terminal this prints a complete line each time another ``every`` fraction of the work is done
(and at the end), on stderr; tqdm has no such mode (its ``mininterval`` still redraws with
``\\r``), hence the small class below. ``LATENT_SINDY_PROGRESS=lines`` forces plain lines and
``bar`` the bar (e.g. to see lines on a terminal).
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

__all__ = ["progress", "PROGRESS_ENV"]

PROGRESS_ENV = "LATENT_SINDY_PROGRESS"


class _Lines:
    """tqdm's ``update``/``close`` interface, printing ``desc: done/total (pct%) elapsed`` lines."""

    def __init__(self, total: int, desc: str, unit: str, file: IO[str], every: float) -> None:
        self.total, self.desc, self.unit, self.file = max(int(total), 0), desc, unit, file
        self.n, self.step, self.t0 = 0, max(1, int(self.total * every)), time.perf_counter()
        self._next = self.step
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next and self.n < self.total:
            self._print()
            while self._next <= self.n:
                self._next += self.step

    def set_postfix(self, **_: Any) -> None:  # the bar's live details; lines carry counts only
        pass

    def _print(self) -> None:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        elapsed = time.perf_counter() - self.t0
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%) {elapsed:.1f} s", file=self.file, flush=True
        )

    def close(self) -> None:
        if not self._closed and self.total:
            self._print()
        self._closed = True

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, *, unit: str = "it", file: IO[str] | None = None, every: float = 0.1) -> Any:
    """A progress counter over ``total`` units: use as a context manager, call ``update(n)``.

    Args:
        total: units of work.
        desc: what is progressing (the line's or bar's prefix).
        unit: the unit's name (shards, images, blocks).
        file: where to write (default stderr).
        every: without a terminal, a line each time this fraction more is done (0.1: every 10%).
    """
    file = file or sys.stderr
    mode = os.environ.get(PROGRESS_ENV, "")
    interactive = mode == "bar" or (mode != "lines" and file.isatty())
    if interactive:
        return tqdm(total=total, desc=desc, unit=unit, file=file, disable=not total)
    return _Lines(total, desc, unit, file, every)
