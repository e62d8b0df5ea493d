"""The `auto | 1 | 0` switches of gpart's kernels (`GPART_TRITON`, `GPART_CPU_KERNEL`), read from the environment,
and `Switches`, the values one model forward decides with (docs/design.md §3.3)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import GpartError

MODES = ("auto", "1", "0")


_parsed: dict[tuple[str, str | None], str] = {}  # (variable, its raw value) -> the mode


def read_mode(variable: str, meanings: str) -> str:
    """The variable's value (default auto); anything else is an error that lists the choices and `meanings`.

    Read where no `Switches` is handed down (an op called outside a model forward), so that a change takes effect
    at the next call; only the parse is remembered.
    """
    raw = os.environ.get(variable)
    value = _parsed.get((variable, raw))
    if value is None:
        value = "auto" if raw is None else raw.strip().lower()
        if value not in MODES:
            raise GpartError(f"{variable}={value!r} is not one of auto, 1, 0: unset it ({meanings})")
        _parsed[(variable, raw)] = value
    return value


@dataclass(frozen=True)
class Switches:
    """The compute-path switches, read once (`dispatch.read_switches`): a model forward reads them in its pre-hook
    and its layers hand them to every op of that forward and of its backward. Read per op instead, they cost about
    6 µs of each op's dispatch (benchmarks/layer_overhead.py, docs/design.md §3.3)."""

    triton: str  # GPART_TRITON
    cpu_kernel: str  # GPART_CPU_KERNEL
    interpret: bool  # TRITON_INTERPRET=1: Triton runs kernels on CPU tensors
