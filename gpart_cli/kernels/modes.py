"""The `auto | 1 | 0` switches of gpart's kernels (`GPART_TRITON`, `GPART_CPU_KERNEL`), read from the environment."""

from __future__ import annotations

import os

from ..errors import GpartError

MODES = ("auto", "1", "0")


def read_mode(variable: str, meanings: str) -> str:
    """The variable's value (default auto); anything else is an error that lists the choices and `meanings`."""
    value = os.environ.get(variable, "auto").strip().lower()
    if value not in MODES:
        raise GpartError(f"{variable}={value!r} is not one of auto, 1, 0: unset it ({meanings})")
    return value
