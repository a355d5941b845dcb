"""Exceptions as reasons a user may read: one line, no server path."""

from __future__ import annotations

from medxai.errors import scrub_paths

__all__ = ["error_text", "unexpected_error_reason"]


def error_text(error: BaseException | str, limit: int = 200) -> str:
    """``Type: message`` of an exception (or a text as it is), with absolute paths replaced by ``<path>`` and
    shortened to ``limit`` characters."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = scrub_paths(text.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unexpected_error_reason(error: BaseException) -> str:
    """An exception nobody anticipated, as the reason an input was skipped: ``unreadable (ValueError: ...)``."""
    return f"unreadable ({error_text(error)})"
