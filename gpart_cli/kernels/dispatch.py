"""Which path a GPart op runs on, so that a bad kernel can never break a run (docs/design.md §3.3).

`GPART_TRITON` chooses:
- `auto` (default): Triton kernels on CUDA when Triton imports. The first call of each kernel class (see
  `selfcheck`) runs the kernel and the reference path on a small random problem; on an exception or a
  mismatch gpart warns once, naming the GPU, dtype and Triton version, and that class uses the reference
  path (cached int32 group ids) for the rest of the process.
- `1`: the kernels wherever Triton can run them (CUDA, and CPU tensors under `TRITON_INTERPRET=1`); a failed
  self-check is an error instead of a fallback.
- `0`: the reference path everywhere.

Each model's `ComputeLog` records which path each op took; `gpart train` prints it and the artifact keeps it.
A model forward reads the switches once (`read_switches`, in the model's forward pre-hook) and its layers hand them
to each op; an op called on its own reads them from the environment.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from ..errors import GpartError
from . import cpu_native, launch
from .modes import Switches, read_mode
from .selfcheck import run_check

_verdicts: dict[tuple, str | None] = {}  # class key -> None (kernel agrees) or why it was rejected
_warned: set[tuple] = set()


class KernelFallbackWarning(UserWarning):
    """A Triton kernel failed its self-check; the run continues on the reference path."""


def mode() -> str:
    return read_mode("GPART_TRITON", "auto: kernels on CUDA with a self-check), or set 1 (kernels, errors on failure) "
                                     "or 0 (reference path")


def read_switches() -> Switches:
    """GPART_TRITON, GPART_CPU_KERNEL and TRITON_INTERPRET as the environment says now."""
    return Switches(mode(), cpu_native.mode(), os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def triton_installed() -> bool:
    # Asked on every GPart op on a GPU; a package search per op would cost more than the op's Python.
    return importlib.util.find_spec("triton") is not None


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # an installed but broken Triton is reported, not raised
        return "not importable"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} (Triton interpreter)" if device.type == "cpu" else device.type


def _why_not(device: torch.device, switches: Switches | None = None) -> str | None:
    """None when Triton can run kernels on `device` under `switches` (None: the environment's), else the reason it
    does not."""
    switches = switches or read_switches()
    chosen = switches.triton
    if chosen == "0":
        return "GPART_TRITON=0"
    if device.type == "cuda":
        if triton_installed():
            return None
        if chosen == "1":
            raise GpartError("GPART_TRITON=1 asks for the Triton kernels but Triton is not installed: "
                             "pip install triton (or unset GPART_TRITON to use the reference path)")
        return "Triton is not installed"
    if device.type == "cpu" and chosen == "1" and switches.interpret and triton_installed():
        return None
    return f"CPU, {cpu_native.describe(switches.cpu_kernel)}" if device.type == "cpu" else \
        f"no kernels for {device.type} tensors"


def _reject(call, reason: str, switches: Switches) -> None:
    where = f"{device_name(call.device)} ({str(call.dtype).removeprefix('torch.')}, Triton {triton_version()})"
    if switches.triton == "1":
        raise GpartError(f"the Triton kernel {call.op!r} failed its self-check on {where}: {reason}. "
                         f"Unset GPART_TRITON to fall back to the reference path, or set GPART_TRITON=0")
    warn_key = (call.op, call.device, call.dtype)
    if warn_key not in _warned:
        _warned.add(warn_key)
        warnings.warn(f"gpart: the Triton kernel {call.op!r} failed its self-check on {where}: {reason}. "
                      f"This run uses the reference path for it (cached int32 group ids, 4 bytes per adapted "
                      f"weight). GPART_TRITON=0 skips the kernels", KernelFallbackWarning, stacklevel=3)


def _check(call) -> str | None:
    try:  # an installed Triton that does not import (a driver or CUDA mismatch) is a failed check too
        from . import triton_gpart
    except Exception as e:
        return f"Triton does not import: {type(e).__name__}: {e}"
    with launch.device_guard(call.device):
        return run_check(call, triton_gpart)


def use_kernel(op: str, device: torch.device, dtype: torch.dtype, log: "ComputeLog | None", make_call,
               deterministic: bool = False, switches: Switches | None = None) -> bool:
    """Whether this op runs on its Triton kernel under `switches` (None: read from the environment now); the first
    call of its class self-checks the kernel.

    `make_call()` describes the call (see `selfcheck`); it is only built where kernels could run, so the
    reference path pays a dictionary store per op and nothing more.
    """
    switches = switches or read_switches()
    reason = _why_not(device, switches)
    if reason is None:
        call = make_call()
        key = call.key()
        if key not in _verdicts:
            _verdicts[key] = _check(call)
        reason = _verdicts[key]
        if reason is not None:
            _reject(call, reason, switches)
            reason = f"self-check failed: {reason}"
    if log is not None:
        log.record(op, device, dtype, reason, deterministic)
    return reason is None


def reset() -> None:
    """Forget every self-check verdict and warning (tests; a new GPU driver in a long-lived process)."""
    _verdicts.clear()
    _warned.clear()


class ComputeLog:
    """Which path each GPart op took in one model: `gpart train` prints it and the artifact stores it."""

    def __init__(self) -> None:
        self.entries: dict[tuple, str | None] = {}  # (op, device, dtype) -> None (triton) or why the reference ran
        self.deterministic = False

    def record(self, op: str, device: torch.device, dtype: torch.dtype, reason: str | None,
               deterministic: bool = False) -> None:
        self.entries[(op, device, dtype)] = reason  # called per op: keep it a dict store
        self.deterministic = self.deterministic or deterministic

    def summary(self) -> dict:
        """JSON-ready: every (op, device, dtype) with its path, and whether ∂L/∂θ was reduced deterministically."""
        rows = sorted((op, str(dev), str(dt).removeprefix("torch."), "triton" if why is None else f"reference: {why}")
                      for (op, dev, dt), why in self.entries.items())
        paths = [{"op": op, "device": dev, "dtype": dt, "path": path} for op, dev, dt, path in rows]
        return {"paths": paths, "deterministic": self.deterministic, "triton": triton_version()}

    def describe(self) -> str:
        return describe(self.summary())


def describe(summary: dict | None) -> str:
    """One line for people: "Triton kernels (cuda:0 bfloat16)", "reference path (CPU, compiled loops)", or both,
    per op."""
    paths = (summary or {}).get("paths") or []
    if not paths:
        return "not recorded"
    places = sorted({f"{p['device']} {p['dtype']}" for p in paths if p["op"] != "ids"})
    kinds = sorted({p["path"] for p in paths})
    if len(kinds) == 1:
        kind = kinds[0]
        what = "Triton kernels" if kind == "triton" else f"reference path ({kind.removeprefix('reference: ')})"
        line = f"{what} on {', '.join(places)}"
    else:
        line = "; ".join(f"{p['op']} on {p['device']} {p['dtype']}: {p['path']}" for p in paths)
    return line + (" · deterministic ∂L/∂θ reduction" if summary.get("deterministic") else "")
