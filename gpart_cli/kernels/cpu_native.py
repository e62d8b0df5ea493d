"""Compiled CPU loops for the reference path's two per-weight ops: the W_eff build and the grouped sum.

With torch ops, building W0 + θ_s[ids] takes three passes over N (ids widened to int64, the gather, the add), and
the grouped sum of ∂L/∂W widens the ids again before its scatter. One C loop per op reads each id once (2 or 4
bytes), so a CPU training step spends about half as long on them (`benchmarks/step_breakdown.py`).

The loops give the same bits as the torch ops they replace: the build adds one fp32 value per weight, and the
grouped sum splits the weights into the same two fixed halves and adds each, in index order, into its own row of
the step's buffer (`theta_grad.GradSink`, whose rows are added once per step). So results never depend on whether
the loops or torch ran, nor on the thread count.

They are compiled on first use with the system C compiler (`$CC`, else `cc`, with OpenMP) into
gpart's cache directory, loaded with ctypes, and checked against the torch ops on a small problem before the
first real call. `GPART_CPU_KERNEL` chooses: `auto` (default; no compiler, a failed compile or a failed check
warns once and the torch ops run), `1` (any of those is an error), `0` (torch ops only).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import GpartError
from .modes import read_mode
from .torch_ops import torch_build, torch_grouped_add

_SOURCE = r"""
#include <stdint.h>

/* out[i] = (drop && drop[i] ? 0 : table[ids[i]]) + (w0 ? w0[i] : 0), i in [0, n). */
#define BUILD(NAME, ID_T)                                                                        \
void NAME(float *out, const float *w0, const float *table, const ID_T *ids, const uint8_t *drop,  \
          int64_t n, int threads) {                                                              \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                            \
    for (int64_t i = 0; i < n; i++) {                                                            \
        float delta = (drop && drop[i]) ? 0.0f : table[ids[i]];                                  \
        out[i] = w0 ? delta + w0[i] : delta;                                                     \
    }                                                                                            \
}

/* rows[c * d + j] += the sum of values[i] for ids[i] == j over the c-th of `chunks` fixed ranges of [0, n), in
   index order, one thread per range; dropped weights are skipped (the torch ops add +0.0 for them, which changes
   no row: rows start at +0.0 and never hold -0.0). */
#define GROUPED_ADD(NAME, ID_T)                                                                  \
void NAME(float *rows, const float *values, const ID_T *ids, const uint8_t *drop, int64_t n,     \
          int64_t d, int chunks, int threads) {                                                  \
    int64_t per = n / chunks;                                                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static, 1)")                         \
    for (int c = 0; c < chunks; c++) {                                                           \
        float *row = rows + (int64_t)c * d;                                                      \
        int64_t hi = (c == chunks - 1) ? n : (c + 1) * per;                                      \
        for (int64_t i = c * per; i < hi; i++)                                                   \
            if (!(drop && drop[i])) row[ids[i]] += values[i];                                    \
    }                                                                                            \
}

BUILD(gpart_build_u16, uint16_t)
BUILD(gpart_build_i32, int32_t)
GROUPED_ADD(gpart_grouped_add_u16, uint16_t)
GROUPED_ADD(gpart_grouped_add_i32, int32_t)
"""

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-fopenmp")
_ID_SUFFIX = {torch.uint16: "u16", torch.int32: "i32"}
_state: dict = {}  # "lib": the loaded library, or None with "why" saying why not


class NoCompiler(RuntimeError):
    """No C compiler on PATH: common on GPU servers, so `auto` falls back without a warning."""


def mode() -> str:
    return read_mode("GPART_CPU_KERNEL", "auto: compiled CPU loops with a self-check, torch ops if they fail), or "
                                         "set 1 (loops, errors on failure) or 0 (torch ops")


def cache_dir() -> Path:
    root = os.environ.get("GPART_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gpart")
    return Path(root) / "cpu-kernels"


def _compiler() -> list[str]:
    """The compiler command: `$CC` split like a shell would ("ccache gcc" works), else `cc`."""
    cc = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    if shutil.which(cc[0]) is None:
        raise NoCompiler(f"no C compiler ({cc[0]!r} is not on PATH)")
    return cc


def has_compiler() -> bool:
    """Whether `$CC` (or `cc`) is on PATH: the loops can be tried here."""
    try:
        _compiler()
    except NoCompiler:
        return False
    return True


def _library_path(cc: list[str]) -> Path:
    """Where the library of this source, compiler (its version too), flags and machine lives in the cache."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    key = "\n".join([_SOURCE, " ".join([*cc, *_FLAGS]), version, platform.machine()])
    return cache_dir() / f"gpart_cpu_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile_to(flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, built = Path(tmp) / "gpart_cpu.c", Path(tmp) / "gpart_cpu.so"
        src.write_text(_SOURCE)
        done = subprocess.run([*flags, str(src), "-o", str(built)], capture_output=True, text=True)
        if done.returncode != 0:
            said = done.stderr.strip().splitlines()
            raise RuntimeError(f"{flags[0]} could not compile the loops: {said[-1] if said else 'failed'}")
        os.replace(built, target)  # atomic: a concurrent process sees the whole library or none


def _compile() -> tuple[ctypes.CDLL, Path]:
    """Build (once per source, compiler, flags and machine) and load the library; raises with the compiler's words.

    OpenMP is required: without it the loops would run on one thread, slower than torch's multi-threaded ops on a
    machine with many cores (Apple's clang lacks it: that machine gets the torch ops and one warning).
    """
    cc = _compiler()
    flags, target = [*cc, *_FLAGS], _library_path(cc)
    if not target.exists():
        _compile_to(flags, target)
    try:
        return ctypes.CDLL(str(target)), target
    except OSError:  # a cached file that does not load (truncated by a full disk): build it once more
        target.unlink(missing_ok=True)
        _compile_to(flags, target)
        return ctypes.CDLL(str(target)), target


def _bind(lib: ctypes.CDLL) -> dict:
    """The loops by id dtype, their argument types set: {"build": {uint16: fn, int32: fn}, "grouped_add": {...}}."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    loops: dict = {"build": {}, "grouped_add": {}}
    for dtype, suffix in _ID_SUFFIX.items():
        build, grouped = getattr(lib, f"gpart_build_{suffix}"), getattr(lib, f"gpart_grouped_add_{suffix}")
        build.argtypes = [p, p, p, p, p, i64, i32]
        grouped.argtypes = [p, p, p, p, i64, i64, i32, i32]
        loops["build"][dtype], loops["grouped_add"][dtype] = build, grouped
    return loops


_PARALLEL_FROM = 1 << 15  # weights; below this one thread is faster than waking the others (the bits are the same)


def _threads(n: int) -> int:
    return max(1, torch.get_num_threads()) if n >= _PARALLEL_FROM else 1


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run_build(loops: dict, w0, table, ids, drop) -> torch.Tensor:
    out = torch.empty(ids.numel(), dtype=torch.float32) if w0 is None else torch.empty_like(w0)  # shaped like w0
    n = ids.numel()
    loops["build"][ids.dtype](out.data_ptr(), _ptr(w0), table.data_ptr(), ids.data_ptr(), _ptr(drop), n, _threads(n))
    return out


def _run_grouped_add(loops: dict, rows, ids, values, drop) -> None:
    chunks = 2 if values.numel() % 2 == 0 else 1  # the torch path's split (reference.torch_grouped_add)
    loops["grouped_add"][ids.dtype](rows.data_ptr(), values.data_ptr(), ids.data_ptr(), _ptr(drop), values.numel(),
                                    rows.shape[1], chunks, min(chunks, _threads(values.numel())))


def _self_check(loops: dict) -> str | None:
    """None if the loops give the torch ops' bits on a small problem (both id widths, with and without a mask)."""
    g = torch.Generator().manual_seed(0)
    d, n = 37, 1000
    table, w0, values = (torch.randn(k, generator=g, dtype=torch.float32) for k in (d, n, n))
    start = torch.randn(2, d, generator=g, dtype=torch.float32)  # rows that already hold other layers' sums
    drop = torch.rand(n, generator=g) < 0.3
    for id_dtype in _ID_SUFFIX:
        ids = torch.randint(0, d, (n,), generator=g).to(id_dtype)
        for mask in (None, drop):
            for base in (w0, None):
                if not torch.equal(_run_build(loops, base, table, ids, mask), torch_build(base, table, ids, mask)):
                    return f"the W_eff build differs from torch's ({id_dtype}, mask={mask is not None})"
            for count in (n, n - 1):  # two halves, one row for an odd count
                part = None if mask is None else mask[:count]
                got, want = start.clone(), start.clone()
                _run_grouped_add(loops, got, ids[:count], values[:count], part)
                torch_grouped_add(want, ids[:count], values[:count].clone(), part)  # (it writes its input: a copy)
                if not torch.equal(got, want):
                    return f"the grouped sum differs from torch's ({id_dtype}, mask={mask is not None}, n={count})"
    return None


def library(chosen: str | None = None) -> dict | None:
    """The checked loops (by op, then id dtype), or None (torch ops) in mode `chosen` (None: GPART_CPU_KERNEL now)
    0 or after a failure. `auto` warns once when a compiler exists but its library fails (a machine without one is
    common: its compute path says "torch ops")."""
    chosen = chosen or mode()
    if chosen == "0":
        return None
    if "lib" not in _state:
        _state.update(_load())
        if _state["why"] is not None and chosen == "auto" and not _state["quiet"]:
            warnings.warn(f"gpart: the compiled CPU loops are not used ({_state['why']}); the CPU path uses torch ops, "
                          f"about 2% slower per step. GPART_CPU_KERNEL=0 skips them", RuntimeWarning, stacklevel=3)
    if _state["lib"] is None and chosen == "1":
        fix = ("install a C compiler with OpenMP (or set CC)" if _state["quiet"] else
               f"fix the compiler setup or delete the cache directory {cache_dir()}")
        raise GpartError(f"GPART_CPU_KERNEL=1 asks for the compiled CPU loops, but {_state['why']}. To use them, "
                         f"{fix}; or unset GPART_CPU_KERNEL to use torch ops")
    return _state["lib"]


def _load() -> dict:
    """lib (the checked loops) or None, why not, and whether that is quiet (no compiler: common, not worth a
    warning)."""
    try:
        lib, path = _compile()
        loops = _bind(lib)
    except NoCompiler as e:
        return {"lib": None, "why": str(e), "quiet": True}
    except Exception as e:  # a compile error, a cache directory that cannot be written
        return {"lib": None, "why": f"{type(e).__name__}: {e}", "quiet": False}
    why = _self_check(loops)
    return {"lib": None if why else loops, "why": f"{why} ({path})" if why else None, "quiet": False}


def describe(chosen: str | None = None) -> str:
    """How the CPU reference path computes in mode `chosen`, for the compute-path line: "compiled loops" or "torch
    ops"."""
    return "compiled loops" if library(chosen) is not None else "torch ops"


def reset() -> None:
    """Forget the loaded library and its verdict (tests)."""
    _state.clear()


def _usable(n: int, *tensors: torch.Tensor | None) -> bool:
    """All on the CPU, contiguous, of n elements (the loops trust their sizes; torch ops check theirs). The one
    device check of the loops: `groups` offers them every call, CUDA tensors included. (A plain loop over cheap
    attribute reads: this runs three times per layer per step.)"""
    for t in tensors:
        if t is not None and not (t.is_cpu and t.numel() == n and t.is_contiguous()):
            return False
    return True


def _differentiable(*tensors: torch.Tensor | None) -> bool:
    # The loops return plain tensors: a call that autograd must see through (delta_weight) takes the torch ops.
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def build(w0: torch.Tensor | None, table: torch.Tensor, ids: torch.Tensor, drop: torch.Tensor | None,
          chosen: str | None = None) -> torch.Tensor | None:
    """fp32 w0 + table[ids], shaped like w0 (dropped weights: w0), or fp32 [n] table[ids] without w0; None where
    the loops do not apply (torch ops run), in mode `chosen` (None: GPART_CPU_KERNEL now)."""
    if (w0 is not None and w0.dtype != torch.float32) or table.dtype != torch.float32 or ids.dtype not in _ID_SUFFIX:
        return None
    if (drop is not None and drop.dtype != torch.bool) or _differentiable(w0, table):
        return None
    if not (_usable(ids.numel(), w0, ids, drop) and _usable(table.numel(), table)):
        return None
    loops = library(chosen)
    return None if loops is None else _run_build(loops, w0, table, ids, drop)


def grouped_add(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, drop: torch.Tensor | None,
                chosen: str | None = None) -> bool:
    """Add the grouped sums of values over ids (dropped weights skipped) into rows (fp32 [2, d]); False where the
    loops do not apply (then the caller runs the torch ops), in mode `chosen` (None: GPART_CPU_KERNEL now)."""
    if values.dtype != torch.float32 or ids.dtype not in _ID_SUFFIX or (drop is not None and drop.dtype != torch.bool):
        return False
    if _differentiable(values) or not _usable(ids.numel(), ids, values, drop):
        return False
    if not (rows.dtype == torch.float32 and rows.dim() == 2 and rows.shape[0] == 2 and _usable(rows.numel(), rows)):
        return False
    loops = library(chosen)
    if loops is None:
        return False
    _run_grouped_add(loops, rows, ids, values, drop)
    return True
