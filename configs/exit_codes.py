"""The exit codes every entry point shares (README, "Exit codes"): 0 done, 2 bad input (configs.cli), 75 preempted."""

from __future__ import annotations

__all__ = ["PREEMPTED_EXIT"]

PREEMPTED_EXIT = 75
"""Exit code of a stage that stopped for a signal (preemption, time limit) before it finished, keeping what it
had finished (checkpoints, finished fits): its final outputs are not written; rerun it (training: with
``resume=auto``) to continue. 75 is EX_TEMPFAIL of sysexits.h ("temporary failure, retry"), distinct from
success (0), a crash (1) and bad input (2)."""
