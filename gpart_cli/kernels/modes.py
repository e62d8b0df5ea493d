"""The `auto | 1 | 0` switches of gpart's kernels (`GPART_TRITON`, `GPART_CPU_KERNEL`), read from the environment."""

from __future__ import annotations

import os

from ..errors import GpartError

MODES = ("auto", "1", "0")


_parsed: dict[tuple[str, str | None], str] = {}  # (variable, its raw value) -> the mode


def read_mode(variable: str, meanings: str) -> str:
    """The variable's value (default auto); anything else is an error that lists the choices and `meanings`.

    Read on every GPart op, so that a change takes effect at the next call; only the parse is remembered.
    """
    raw = os.environ.get(variable)
    value = _parsed.get((variable, raw))
    if value is None:
        value = "auto" if raw is None else raw.strip().lower()
        if value not in MODES:
            raise GpartError(f"{variable}={value!r} is not one of auto, 1, 0: unset it ({meanings})")
        _parsed[(variable, raw)] = value
    return value
