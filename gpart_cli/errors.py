"""The one error family gpart raises for problems the user can fix.

The CLI turns a `GpartError` into a clear message and exit code 2; anything else is a bug (exit 1).
"""

from __future__ import annotations


class GpartError(Exception):
    """A user-fixable problem: bad recipe field, missing file, mismatched adapter.

    Messages name the field or file and say how to fix it.
    """


def nearest(word: str, choices) -> str | None:
    """The closest valid spelling of `word` among `choices`, or None if nothing is close."""
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
