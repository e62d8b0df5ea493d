"""Where a command runs and in which precision: the one place `train`, `eval` and `merge` ask.

Device: `--device` (default: `cuda` when torch sees a GPU, else `cpu`). Asking for a GPU that is not there is a user
error (exit 2), never a silent fall back to a CPU run that would take days.

Precision has two parts, as in training: the dtype the weights are loaded in (the recipe's `model.dtype`) and the
autocast dtype the forward runs under (`train.precision`: `bf16`, or `auto` = bf16 on a GPU that has it). `gpart eval`
of an adapter or run uses the precision its run trained in; `--dtype` loads the weights in that dtype instead, with
no autocast on top.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import GpartError

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """"bfloat16" for torch.bfloat16 (the spelling transformers' configs use)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def resolve_device(requested: str | None = None) -> torch.device:
    """The torch device for `--device` (None or "auto": cuda when available, else cpu).

    Raises:
        GpartError: an unknown device name, or a CUDA device this machine does not have.
    """
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise GpartError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise GpartError(f"--device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise GpartError(f"--device {requested}: torch sees no CUDA device on this machine (torch {torch.__version__}, "
                         f"{build}). Install a CUDA build of torch on a GPU machine, or pass --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise GpartError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered 0..{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`: bf16 when asked, or `auto` on a bf16-capable GPU."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class Precision:
    """The weights' dtype, and the autocast dtype the forward runs under (None: no autocast)."""

    weights: str = "float32"             # a transformers dtype name, or "auto" (the checkpoint's own dtype)
    autocast: torch.dtype | None = None

    def context(self, device: torch.device):
        """`with precision.context(device):` runs the forward as training did."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def record(self, model: torch.nn.Module | None = None) -> dict:
        """{"dtype", "autocast"} for a scores file: the dtype the weights really hold once loaded."""
        dtype = self.weights
        if model is not None:
            dtype = dtype_name(next((p.dtype for p in model.parameters() if p.is_floating_point()), None)) or dtype
        return {"dtype": dtype, "autocast": dtype_name(self.autocast)}


def check_dtype(name: str, flag: str = "--dtype") -> str:
    """`name` if it is a dtype gpart loads weights in; GpartError naming `flag` otherwise."""
    if name not in DTYPE_NAMES:
        raise GpartError(f"{flag} {name!r} is not supported; use one of float32, bfloat16, float16")
    return dtype_name(DTYPE_NAMES[name])


def eval_precision(device: torch.device, recipe: dict | None, override: str | None = None) -> Precision:
    """The precision `gpart eval` scores in.

    `--dtype` wins (weights in that dtype, no autocast). Otherwise a run's recipe gives the precision it trained in
    (`model.dtype` weights under `train.precision`'s autocast). A plain model with no recipe loads in its checkpoint's
    own dtype on a GPU (a bf16 release stays bf16) and in float32 on the CPU.
    """
    if override is not None:
        return Precision(check_dtype(override))
    if recipe:
        weights = ((recipe.get("model") or {}).get("dtype")) or "float32"
        precision = ((recipe.get("train") or {}).get("precision")) or "auto"
        return Precision(check_dtype(weights, "the run's model.dtype"), autocast_dtype(precision, device))
    return Precision("auto" if device.type == "cuda" else "float32")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
