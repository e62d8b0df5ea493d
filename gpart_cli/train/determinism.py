"""`train.deterministic: true`: bit-reproducible GPU runs (docs/design.md §3.4).

CPU runs are bit-reproducible without it. On a GPU it switches on
- torch's deterministic algorithms: ops with a deterministic variant use it (index_add_, scatter, cuDNN), and
  an op that has none raises instead of silently varying;
- `CUBLAS_WORKSPACE_CONFIG=:4096:8`, which cuBLAS needs for reproducible GEMMs (read when its first handle is
  made, so this runs before the model is built);
- in GPart's Triton kernels, an int64 fixed-point reduction of ∂L/∂θ instead of fp32 atomics: integer sums do
  not depend on the order the tiles arrive in (see `kernels/triton_gpart.py`).
Unlike transformers' `enable_full_determinism`, it leaves CUDA_LAUNCH_BLOCKING alone: serial launches cost
speed and do not change any result.
"""

from __future__ import annotations

import os

import torch


def configure(deterministic: bool) -> None:
    """Switch the process to deterministic algorithms when asked; otherwise leave torch's settings as they are."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
