"""How messages echo what a user gave: values and whole lines cut to a readable length (no imports of ours, so
every module of ``configs`` can use it without a circle)."""

from __future__ import annotations

__all__ = ["MESSAGE_LIMIT", "shorten"]

MESSAGE_LIMIT = 2000
"""The most characters of an error line: a message that echoes a huge value (a 50 MB path) is cut."""


def shorten(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters plus ``... (N characters)``: how messages echo a user's value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
