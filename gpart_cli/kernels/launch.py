"""How a Triton kernel launches: on its tensors' device, with the tl.dot precision its dtype needs (docs/design.md
§3.3). Shared by the launchers (`triton_gpart`), the dispatcher and the layer ops, which must agree on both."""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device):
    """Make `device` current while kernels launch: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """(tl.dot input_precision, upcast) for the gradient GEMM on `dtype` inputs.

    fp32: "ieee" unless torch allows TF32 matmuls. bf16/fp16: upcast to fp32, then "tf32" on sm80+ (their
    values are exact in tf32, so the products are exact) and "ieee" elsewhere (older GPUs, the interpreter).
    """
    tensor_cores = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if dtype == torch.float32:
        return ("tf32" if tensor_cores and torch.backends.cuda.matmul.allow_tf32 else "ieee"), False
    return ("tf32" if tensor_cores else "ieee"), True
