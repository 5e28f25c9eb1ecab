"""UserError: the one exception of an expected failure, below every other module of ``configs``.

configs.cli prints it as one line and exit code 2; configs.checks, configs.schema and configs.io raise it (or a
subclass) without importing the CLI, so that no circle joins them. ``from configs.cli import UserError`` still
works (cli imports it from here).
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(RuntimeError):
    """An expected failure caused by input (missing files, mismatched runs, a bad config): the
    message names the problem and the fix; reported as one line and exit code 2."""
