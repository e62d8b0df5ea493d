"""Where one layer's weights sit in the partition (DESIGN §2-3), and the two ways to use it.

A layer owns the global indices [offset, offset + n_weight + n_bias): its weight in storage order, then its bias.
- CPU (and GPUs without Triton): the int32 group ids of that range, built once on first use (4 bytes per
  adapted parameter), drive one gather for ΔW and one `index_add_` for ∂L/∂θ.
- CUDA with Triton: no ids at all; the kernels recompute each group from (index, seed, d, N) inside the
  W_eff build and inside the ∂L/∂W GEMM, whose tiles go straight into ∂L/∂θ (0 bytes of partition state).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .partition import group_ids


def kernels_available(device: torch.device) -> bool:
    """Use the Triton kernels on CUDA unless GPART_TRITON=0 (the reference path, for comparisons)."""
    return (device.type == "cuda" and os.environ.get("GPART_TRITON", "1") != "0"
            and importlib.util.find_spec("triton") is not None)


class LayerGroups:
    """The partition slice of one adapted layer."""

    def __init__(self, offset: int, n_weight: int, n_bias: int, n: int, d: int, seed: int) -> None:
        self.offset, self.n_weight, self.n_bias = offset, n_weight, n_bias
        self.n, self.d, self.seed = n, d, seed
        self._ids: torch.Tensor | None = None

    def ids(self, device: torch.device) -> torch.Tensor:
        """Cached int32 group ids of weight then bias, on `device` (built on the CPU, then moved)."""
        if self._ids is None or self._ids.device != device:
            ids = self._ids if self._ids is not None else group_ids(self.n, self.d, self.seed, self.offset,
                                                                    self.n_weight + self.n_bias)
            self._ids = ids.to(device)
        return self._ids

    def state_bytes(self) -> int:
        return 0 if self._ids is None else self._ids.numel() * self._ids.element_size()

    def effective_weight(self, weight: torch.Tensor, theta_s: torch.Tensor) -> torch.Tensor:
        """W0 + ΔW in the base dtype, summed in fp32 and rounded once."""
        if kernels_available(weight.device):
            from .kernels.triton_gpart import effective_weight

            return effective_weight(weight, theta_s, self.offset, self.n, self.d, self.seed)
        return _gather_add(weight, theta_s, self.ids(weight.device)[: self.n_weight])

    def delta_weight(self, theta_s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """ΔW alone (fp32), for quantized bases where W0 cannot be added to: uses the cached ids."""
        return theta_s.index_select(0, self.ids(theta_s.device)[: self.n_weight]).view(shape)

    def effective_bias(self, bias: torch.Tensor, theta_s: torch.Tensor) -> torch.Tensor:
        return _gather_add(bias, theta_s, self._bias_ids(bias.device))

    def _bias_ids(self, device: torch.device) -> torch.Tensor:
        if kernels_available(device):  # a bias is small: recompute its ids rather than cache them
            from .kernels.triton_gpart import group_ids_triton

            return group_ids_triton(self.n, self.d, self.seed, self.offset + self.n_weight, self.n_bias, device)
        return self.ids(device)[self.n_weight:]

    def add_weight_grad(self, grad_theta: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, transposed: bool) -> None:
        """grad_theta[g(i)] += ∂L/∂W_i for gy (T, out) and x (T, in), without keeping ∂L/∂W afterwards."""
        if kernels_available(gy.device):
            from .kernels.triton_gpart import grad_theta_from_gemm

            grad_theta_from_gemm(grad_theta, gy.contiguous(), x.contiguous(), self.offset, self.n, self.d,
                                 self.seed, transposed)
            return
        gw = gy.t() @ x  # (out, in)
        gw = gw.t() if transposed else gw
        grad_theta.index_add_(0, self.ids(gy.device)[: self.n_weight], gw.reshape(-1).float())

    def add_bias_grad(self, grad_theta: torch.Tensor, gb: torch.Tensor) -> None:
        grad_theta.index_add_(0, self._bias_ids(gb.device), gb.float())


def _gather_add(base: torch.Tensor, theta_s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # One W-sized allocation: the gathered ΔW buffer receives W0 in place.
    delta = theta_s.index_select(0, ids).view(base.shape)
    if base.dtype == torch.float32:
        return delta.add_(base)
    return delta.add_(base.float()).to(base.dtype)
