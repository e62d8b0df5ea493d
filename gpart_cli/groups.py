"""Where one layer's weights sit in the partition (docs/design.md §2-3), and the two ways to compute with it.

A layer owns the global indices [offset, offset + n_weight + n_bias): its weight in storage order, then its bias.
- Triton kernels (CUDA, see `kernels.dispatch`): no ids at all; the kernels recompute each group from
  (algorithm, index, seed, d, N) inside the W_eff build and inside the ∂L/∂W GEMM, whose tiles go straight into
  ∂L/∂θ (0 bytes of partition state). Only for algorithms with random access (feistel-v1, splitmix64-mod-v1):
  torch-randint-v1 ids come from a sequential stream and are cached on every device.
- The reference path (CPU, GPUs without Triton, a kernel that failed its self-check): the group ids of the
  range, built once on first use, drive a gather for ΔW and a grouped sum of ∂L/∂W for ∂L/∂θ. They are int32
  (4 bytes per adapted parameter), or uint16 (2 bytes) on the CPU when d ≤ 65,536, as in most recipes: the CPU
  ops widen ids to int64 anyway, and reading half the bytes makes a CPU step's gather and grouped sum faster.

Dropout on ΔW is a (threshold, key) pair (see `gpart_cli.rng`): both paths recompute the mask from the key.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import rng
from .kernels import cpu_native
from .kernels.dispatch import ComputeLog, device_guard, dot_precision, use_kernel
from .kernels.reference import Scaling, scale_grad, torch_build, torch_grouped_sum
from .kernels.selfcheck import BuildCall, GradCall, IdsCall
from .partition import ALGORITHM
from .partitions import Partition

_UINT16_GROUPS = 2**16  # ids 0 .. 65,535 fit uint16
Dropout = Optional[tuple[int, int]]  # (threshold, key): drop weight i iff rng u(i) < threshold


def _kernels():
    from .kernels import triton_gpart

    return triton_gpart


class LayerGroups:
    """The partition slice of one adapted layer."""

    def __init__(self, offset: int, n_weight: int, n_bias: int, n: int, d: int, seed: int,
                 log: ComputeLog | None = None, partition: Partition | None = None) -> None:
        self.offset, self.n_weight, self.n_bias = offset, n_weight, n_bias
        self.n, self.d, self.seed = n, d, seed
        self.log = log
        self.partition = partition or Partition(ALGORITHM, n, d, seed)
        self.algorithm = self.partition.algorithm
        self._ids: torch.Tensor | None = None

    def _kernel(self, op: str, device: torch.device, dtype: torch.dtype, make_call, deterministic: bool = False
                ) -> bool:
        # torch-randint-v1 ids come from a sequential stream, not from the index: cached ids on every device.
        return self.partition.on_the_fly and use_kernel(op, device, dtype, self.log, make_call, deterministic)

    # ---- the reference path's id cache ---------------------------------------------------------------
    def ids(self, device: torch.device) -> torch.Tensor:
        """Cached group ids of weight then bias on `device` (int32; uint16 on the CPU when d ≤ 65,536): built
        there on a GPU, else with NumPy."""
        if self._ids is None or self._ids.device != device:
            gpu = device.type == "cuda"
            ids = self.partition.ids(self.offset, self.n_weight + self.n_bias, device=device if gpu else None)
            if device.type == "cpu" and self.d <= _UINT16_GROUPS:
                ids = ids.to(torch.uint16)
            self._ids = ids if gpu else ids.to(device)
        return self._ids

    def release(self) -> None:
        """Free the id cache (merge does this layer by layer); it is rebuilt if the layer is used again."""
        self._ids = None

    def state_bytes(self) -> int:
        return 0 if self._ids is None else self._ids.numel() * self._ids.element_size()

    # ---- ΔW ------------------------------------------------------------------------------------------
    def build(self, weight: torch.Tensor | None, theta_s: torch.Tensor, *, shape=None, dtype=None,
              dropout: Dropout = None) -> torch.Tensor:
        """W0 + ΔW in the base dtype (summed in fp32, rounded once), or ΔW alone (`weight` None) in `dtype`."""
        device = theta_s.device
        out_dtype = dtype if weight is None else weight.dtype
        if self._kernel("build", device, out_dtype, lambda: BuildCall(
                device, out_dtype, weight is not None, dropout is not None, self.offset, self.n_weight, self.n,
                self.d, self.seed, self.algorithm)):
            with device_guard(device):
                return _kernels().build_weight(weight, theta_s, self.offset, self.n, self.d, self.seed,
                                               shape=shape, dtype=dtype, dropout=dropout, algorithm=self.algorithm)
        ids, drop = self.ids(device)[: self.n_weight], self._drop_mask(dropout, device)
        if weight is None:
            return _build(None, theta_s, ids, drop).view(shape).to(dtype)
        return _build(weight.reshape(-1), theta_s, ids, drop).view(weight.shape).to(weight.dtype)

    def _drop_mask(self, dropout: Dropout, device: torch.device) -> torch.Tensor | None:
        return None if dropout is None else rng.drop_mask(self.offset, self.n_weight, dropout[1], dropout[0], device)

    def effective_bias(self, bias: torch.Tensor, theta_s: torch.Tensor) -> torch.Tensor:
        delta = theta_s.index_select(0, self._bias_ids(theta_s.device))
        return delta.add_(bias.float()).to(bias.dtype)

    def _bias_ids(self, device: torch.device) -> torch.Tensor:
        # A bias is small: on the kernel path its ids are recomputed rather than cached.
        start = self.offset + self.n_weight
        if self._kernel("ids", device, torch.int32,
                        lambda: IdsCall(device, start, self.n_bias, self.n, self.d, self.seed, self.algorithm)):
            with device_guard(device):
                return _kernels().group_ids_triton(self.n, self.d, self.seed, start, self.n_bias, device,
                                                   algorithm=self.algorithm)
        return self.ids(device)[self.n_weight:].int()  # index_select / index_add_ take int32, not uint16

    # ---- ∂L/∂θ ---------------------------------------------------------------------------------------
    def weight_grad(self, gy: torch.Tensor, x: torch.Tensor, transposed: bool, dropout: Dropout = None,
                    scaling: Scaling = None) -> torch.Tensor:
        """∂L/∂θ_scaled from this layer's weight: the grouped sum of ∂L/∂W = gy^T x for gy (T, out) and
        x (T, in), fp32 [d]; ∂L/∂W is not kept. With `scaling`, ∂L/∂θ itself (`reference.scale_grad` applied: the
        compiled CPU loop fuses it into its last pass over d)."""
        device = gy.device
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self._kernel("grad", device, gy.dtype, lambda: GradCall(
                device, gy.dtype, transposed, dropout is not None, deterministic,
                dot_precision(gy.dtype, device)[0], *gy.shape, x.shape[1], self.offset, self.n, self.d, self.seed,
                self.algorithm), deterministic):
            grad = torch.zeros(self.d, dtype=torch.float32, device=device)
            with device_guard(device):
                _kernels().grad_from_gemm(grad, gy.contiguous(), x.contiguous(), self.offset, self.n, self.d,
                                          self.seed, transposed, dropout=dropout, deterministic=deterministic,
                                          max_members=self.partition.max_members(), algorithm=self.algorithm)
            return scale_grad(grad, scaling)
        gw = _weight_grad(gy, x, transposed).reshape(-1)  # in W's storage order, fp32
        return _grouped_sum(self.ids(device)[: self.n_weight], gw, self.d, self._drop_mask(dropout, device), scaling)

    def add_bias_grad(self, grad_theta: torch.Tensor, gb: torch.Tensor) -> None:
        grad_theta.index_add_(0, self._bias_ids(gb.device), gb.float())


def _build(w0: torch.Tensor | None, table: torch.Tensor, ids: torch.Tensor, drop: torch.Tensor | None
           ) -> torch.Tensor:
    """fp32 [n]: w0 + table[ids] (w0 None: table[ids]); dropped weights get no update. The compiled CPU loops
    where they apply (CPU tensors), else torch ops; both give the same bits."""
    built = cpu_native.build(w0, table, ids, drop)
    return torch_build(w0, table, ids, drop) if built is None else built


def _grouped_sum(ids: torch.Tensor, values: torch.Tensor, d: int, drop: torch.Tensor | None = None,
                 scaling: Scaling = None) -> torch.Tensor:
    """sums[j] = the sum of values[i] over ids[i] == j and not drop[i], a new fp32 [d] tensor, in a fixed order
    (deterministic), times `scaling`: the compiled CPU loops where they apply (CPU tensors), else torch ops, with
    the same bits."""
    sums = cpu_native.grouped_sum(ids, values, d, drop, scaling)
    return scale_grad(torch_grouped_sum(ids, values, d, drop), scaling) if sums is None else sums


def _weight_grad(gy: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """∂L/∂W = gy^T x shaped like W ((out, in), or (in, out) for Conv1D), in fp32."""
    a, b = (x, gy) if transposed else (gy, x)
    if a.dtype != torch.float32 and a.device.type == "cuda":
        try:  # fp32 output straight from the GEMM: no W-sized low-precision result plus an fp32 copy of it
            return torch.mm(a.t(), b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=...) for this dtype
            pass
    return (a.t() @ b).float()
