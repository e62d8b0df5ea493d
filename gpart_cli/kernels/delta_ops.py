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
Each op takes the `Switches` of the model forward it belongs to; without them (an op called on its own) it reads
them from the environment.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import rng
from ..partition import Partition
from . import cpu_native
from .dispatch import ComputeLog, read_switches, use_kernel
from .launch import device_guard, dot_precision
from .modes import Switches
from .selfcheck import BuildCall, GradCall, IdsCall
from .torch_ops import torch_build, torch_grouped_add

_UINT16_GROUPS = 2**16  # ids 0 .. 65,535 fit uint16
Dropout = Optional[tuple[int, int]]  # (threshold, key): drop weight i iff rng u(i) < threshold


def _kernels():
    from . import triton_gpart

    return triton_gpart


class LayerGroups:
    """The partition slice of one adapted layer: `partition`'s global indices [offset, offset + n_weight + n_bias),
    its weight then its bias; `log` records which path each op took."""

    def __init__(self, partition: Partition, offset: int, n_weight: int, n_bias: int,
                 log: ComputeLog | None = None) -> None:
        self.partition, self.offset, self.n_weight, self.n_bias, self.log = partition, offset, n_weight, n_bias, log
        # copies of the partition's fields: read by every op's self-check description and kernel launch
        self.algorithm, self.n, self.d, self.seed = partition.algorithm, partition.n, partition.d, partition.seed
        self._ids: torch.Tensor | None = None
        self._weight_ids: tuple | None = None  # (ids, the weight's part of them): a view asked for every call

    def _kernel(self, op: str, device: torch.device, dtype: torch.dtype, make_call, switches: Switches,
                deterministic: bool = False) -> bool:
        # torch-randint-v1 ids come from a sequential stream, not from the index: cached ids on every device.
        return self.partition.on_the_fly and use_kernel(op, device, dtype, self.log, make_call, deterministic,
                                                        switches)

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

    def weight_ids(self, device: torch.device) -> torch.Tensor:
        """The weight's cached group ids on `device` (`ids` without the bias)."""
        ids = self.ids(device)
        if self._weight_ids is None or self._weight_ids[0] is not ids:
            self._weight_ids = (ids, ids[: self.n_weight])
        return self._weight_ids[1]

    def release(self) -> None:
        """Free the id cache (merge does this layer by layer); it is rebuilt if the layer is used again."""
        self._ids = self._weight_ids = None

    def state_bytes(self) -> int:
        return 0 if self._ids is None else self._ids.numel() * self._ids.element_size()

    # ---- ΔW ------------------------------------------------------------------------------------------
    def build(self, weight: torch.Tensor | None, theta_s: torch.Tensor, *, shape=None, dtype=None,
              dropout: Dropout = None, switches: Switches | None = None) -> torch.Tensor:
        """W0 + ΔW in the base dtype (summed in fp32, rounded once), or ΔW alone (`weight` None) in `dtype`."""
        device, switches = theta_s.device, switches or read_switches()
        out_dtype = dtype if weight is None else weight.dtype
        if self._kernel("build", device, out_dtype, lambda: BuildCall(
                device, out_dtype, weight is not None, dropout is not None, self.offset, self.n_weight, self.n,
                self.d, self.seed, self.algorithm), switches):
            with device_guard(device):
                return _kernels().build_weight(weight, theta_s, self.offset, self.n, self.d, self.seed,
                                               shape=shape, dtype=dtype, dropout=dropout, algorithm=self.algorithm)
        ids, drop = self.weight_ids(device), self._drop_mask(dropout, device)
        if weight is None:
            return as_dtype(_build(None, theta_s, ids, drop, switches.cpu_kernel).view(shape), dtype)
        return as_dtype(_build(weight, theta_s, ids, drop, switches.cpu_kernel), weight.dtype)

    def _drop_mask(self, dropout: Dropout, device: torch.device) -> torch.Tensor | None:
        return None if dropout is None else rng.drop_mask(self.offset, self.n_weight, dropout[1], dropout[0], device)

    def effective_bias(self, bias: torch.Tensor, theta_s: torch.Tensor, switches: Switches | None = None
                       ) -> torch.Tensor:
        delta = theta_s.index_select(0, self._bias_ids(theta_s.device, switches or read_switches()))
        return delta.add_(bias.float()).to(bias.dtype)

    def _bias_ids(self, device: torch.device, switches: Switches) -> torch.Tensor:
        # A bias is small: on the kernel path its ids are recomputed rather than cached.
        start = self.offset + self.n_weight
        if self._kernel("ids", device, torch.int32,
                        lambda: IdsCall(device, start, self.n_bias, self.n, self.d, self.seed, self.algorithm),
                        switches):
            with device_guard(device):
                return _kernels().group_ids_triton(self.n, self.d, self.seed, start, self.n_bias, device,
                                                   algorithm=self.algorithm)
        return self.ids(device)[self.n_weight:].int()  # index_select / index_add_ take int32, not uint16

    # ---- ∂L/∂θ ---------------------------------------------------------------------------------------
    def add_weight_grad(self, rows: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, transposed: bool,
                        dropout: Dropout = None, switches: Switches | None = None) -> None:
        """Add this layer's grouped sum of ∂L/∂W = gy^T x (gy (T, out), x (T, in)) into `rows` (fp32
        [sink_rows(device), d], see `theta_grad.GradSink`), unscaled; ∂L/∂W is not kept."""
        device, switches = gy.device, switches or read_switches()
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self._kernel("grad", device, gy.dtype, lambda: GradCall(
                device, gy.dtype, transposed, dropout is not None, deterministic,
                dot_precision(gy.dtype, device)[0], *gy.shape, x.shape[1], self.offset, self.n, self.d, self.seed,
                self.algorithm), switches, deterministic):
            with device_guard(device):
                _kernels().grad_from_gemm(rows[0], gy.contiguous(), x.contiguous(), self.offset, self.n, self.d,
                                          self.seed, transposed, dropout=dropout, deterministic=deterministic,
                                          max_members=self.partition.max_members(), algorithm=self.algorithm)
            return
        gw = _weight_grad(gy, x, transposed).reshape(-1)  # in W's storage order, fp32
        _grouped_add(rows, self.weight_ids(device), gw, self._drop_mask(dropout, device), switches.cpu_kernel)

    def add_bias_grad(self, target: torch.Tensor, gb: torch.Tensor, switches: Switches | None = None) -> None:
        """Add ∂L/∂b into `target`, fp32 [d] (a gradient, or a sink's first row)."""
        target.index_add_(0, self._bias_ids(gb.device, switches or read_switches()), gb.float())


def sink_rows(device: torch.device) -> int:
    """Rows of a grouped-sum buffer on `device`: two on the CPU (the grouped sum splits the weights into two fixed
    halves, one per thread, and adds the rows at the end: the bits never depend on the thread count), else one."""
    return 2 if device.type == "cpu" else 1


def combine_rows(rows: torch.Tensor) -> torch.Tensor:
    """The grouped sums in `rows`, added: a new fp32 [d] tensor."""
    return rows[0].clone() if rows.shape[0] == 1 else torch.add(rows[0], rows[1])


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`. `t.to(dtype)` costs a dispatch even when it changes nothing, and the layer's ops run a few
    times per layer per step."""
    return t if t.dtype == dtype else t.to(dtype)


def _build(w0: torch.Tensor | None, table: torch.Tensor, ids: torch.Tensor, drop: torch.Tensor | None,
           cpu_mode: str) -> torch.Tensor:
    """fp32 w0 + table[ids] shaped like w0 (w0 None: table[ids], [n]); dropped weights get no update. The compiled
    CPU loops where they apply (CPU tensors, `cpu_mode` not 0), else torch ops; both give the same bits."""
    built = cpu_native.build(w0, table, ids, drop, cpu_mode)
    if built is not None:
        return built
    if w0 is None:
        return torch_build(None, table, ids, drop)
    return torch_build(w0.reshape(-1), table, ids, drop).view_as(w0)


def _grouped_add(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, drop: torch.Tensor | None,
                 cpu_mode: str) -> None:
    """rows[c, j] += the sum of values[i] over ids[i] == j and not drop[i], for i in the c-th fixed part of the
    weights, in index order (deterministic): the compiled CPU loops where they apply (CPU tensors, `cpu_mode` not 0),
    else torch ops, with the same bits."""
    if not cpu_native.grouped_add(rows, ids, values, drop, cpu_mode):
        torch_grouped_add(rows, ids, values, drop)


def _weight_grad(gy: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """∂L/∂W = gy^T x shaped like W ((out, in), or (in, out) for Conv1D), in fp32."""
    a, b = (x, gy) if transposed else (gy, x)
    if a.dtype != torch.float32 and a.device.type == "cuda":
        try:  # fp32 output straight from the GEMM: no W-sized low-precision result plus an fp32 copy of it
            return torch.mm(a.t(), b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=...) for this dtype
            pass
    return as_dtype(a.t() @ b, torch.float32)
