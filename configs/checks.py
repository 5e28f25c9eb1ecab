"""The value checks every config section uses: one error type and one message style.

A check failing raises ConfigError (a configs.cli.UserError): the entry point prints it as one
line and exits 2, before any work. Messages name the key, the bad value and the allowed range.
"""

from __future__ import annotations

import os
import re

from configs.errors import UserError
from configs.text import shorten

# Linux's NAME_MAX and PATH_MAX (limits.h); a longer name or path fails at the first open with
# "File name too long", after the job has waited in the queue.
NAME_MAX = 255
PATH_MAX = 4096
MESSAGE_LIMIT = 600
"""A check's message longer than this keeps its start and its end (the fix) around a count."""


class ConfigError(UserError, ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


def cap_message(msg: str, limit: int = MESSAGE_LIMIT) -> str:
    """``msg`` if short, else its first and last characters around ``... (N characters) ...``: a message that
    echoes a huge value stays one readable line."""
    if len(msg) <= limit:
        return msg
    tail = limit // 3
    return f"{msg[: limit - tail]}... ({len(msg)} characters) ...{msg[-tail:]}"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(cap_message(msg))


def _positive(section: str, **values: float) -> None:
    for k, v in values.items():
        _check(v > 0, f"{section}.{k} must be > 0, got {v}")


def _non_negative(section: str, **values: float) -> None:
    for k, v in values.items():
        _check(v >= 0, f"{section}.{k} must be >= 0, got {v}")


def _at_most(section: str, bound: float, **values: float) -> None:
    for k, v in values.items():
        _check(v <= bound, f"{section}.{k} must be <= {bound}, got {v}")


# Names become folder names, Slurm job names and words of generated shell scripts: a strict
# pattern (no shell metacharacters, whitespace, quotes or path separators) keeps all three safe.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _name(key: str, value: str) -> None:
    _check(
        NAME_RE.fullmatch(value) is not None and ".." not in value,
        f"{key} must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or "
        f"digit and without '..', got {shorten(value)}",
    )


def _one_line(key: str, value: str) -> None:
    """Paths and shell lines: a newline or other control character would split a generated script line."""
    _check(
        _CONTROL_RE.search(value) is None,
        f"{key} must not contain newlines or control characters, got {shorten(value)}",
    )


def _path(key: str, value: str) -> None:
    """A path the stages will open: one line, every component at most NAME_MAX bytes, the whole at most PATH_MAX."""
    _one_line(key, value)
    size = len(os.fsencode(value))
    _check(
        size < PATH_MAX, f"{key} is {size} bytes long, more than the system's path limit {PATH_MAX}: {shorten(value)}"
    )
    for part in value.split("/"):
        n = len(os.fsencode(part))
        _check(
            n <= NAME_MAX,
            f"{key} has a {n}-byte component, more than the system's file name limit {NAME_MAX}: {shorten(part)}",
        )
