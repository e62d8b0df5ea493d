"""Keep freed CPU memory in the process for reuse (glibc), as PyTorch's caching allocator does on a GPU.

glibc hands large freed blocks back to the kernel (munmap, and trimming the top of the heap), so every training
step on the CPU page-faults and zeroes its activations, gradients and temporaries afresh: ~37K minor faults and
~75 ms of kernel time per step of `benchmarks/step_time.py --preset medium` for every method, more for GPart,
whose build and grouped sum allocate W-sized temporaries. Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps
those blocks in the heap: the next step reuses them with no fault. The resident high-water mark does not grow
(the memory was in use at the peak anyway); what changes is that the resident size no longer shrinks between steps.
It is what the usual advice for PyTorch on CPUs (jemalloc or tcmalloc via LD_PRELOAD) achieves, without a preload
(with one, glibc's settings are unused and harmless).

Left alone when the user set glibc's own MALLOC_*_ variables or GPART_CPU_ALLOC=0, and off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap, so they can be reused
TRIM_THRESHOLD = 1 << 30    # free memory at the top of the heap returned to the kernel only past this
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("GPART_CPU_ALLOC", "1") == "0" or any(os.environ.get(k) for k in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                            TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
