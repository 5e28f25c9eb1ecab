"""The value checks every config section uses: one error type and one message style.

A check failing raises ConfigError (a configs.cli.UserError): the entry point prints it as one
line and exits 2, before any work. Messages name the key, the bad value and the allowed range.
"""

from __future__ import annotations

import re

from configs.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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
        f"digit and without '..', got {value!r}",
    )


def _one_line(key: str, value: str) -> None:
    """Paths and shell lines: a newline or other control character would split a generated script line."""
    _check(_CONTROL_RE.search(value) is None, f"{key} must not contain newlines or control characters, got {value!r}")
