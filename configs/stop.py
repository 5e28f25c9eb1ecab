"""Stop signals for a driver that waits on other processes (the SINDy job's Ray driver).

Slurm preemption and the time limit send SIGTERM (or the ``--signal`` of the job script, SIGUSR1). The job must
then keep what it finished, remove its temporary files and exit 75 (configs.exit_codes), as the training stages
do. The handler raises :class:`Stopped` in the main thread, except while the driver is inside a call that must
not be interrupted by an exception (Ray's C++ wait runs Python signal handlers inside itself and turns their
exceptions into a SystemError): there it only records the signal, and :meth:`StopSignals.check` raises it as
soon as the call returns.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STOP_SIGNALS", "STOPS", "Stopped", "StopSignals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, so that ``except Exception`` clean-ups do not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """The process's stop-signal state: install once, then ``with stops.deferred(): ...`` around blocking calls."""

    def __init__(self) -> None:
        self.signum = 0
        self._defer = 0

    def install(self) -> StopSignals:
        """Handle SIGTERM and SIGUSR1 from now on (call after libraries that install their own, e.g. ray.init)."""
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        if not self._defer:
            raise Stopped(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: a signal is only recorded; on the way out (and at :meth:`check`) it is raised."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        self.check()

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop signal has arrived."""
        if self.signum:
            raise Stopped(self.signum)


STOPS = StopSignals()
"""The one instance of the process (signal handlers are process-wide)."""
