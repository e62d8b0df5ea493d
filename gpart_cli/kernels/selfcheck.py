"""The kernels' self-check: run a kernel and the reference path on a small random problem of the same class.

A class is what makes Triton compile a separate kernel: the op, its compile-time switches, the device and
dtype, and how Triton specialises each integer argument (equal to 1, a multiple of 16, wider than int32).
The check problem keeps the real call's partition (n, d, seed, start offset) and the residues of its sizes
mod 16, but shrinks every size to at most 63, so it costs a few milliseconds once per class and process.
Inputs come from a private generator: the check never moves the run's RNG streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rng
from ..partition import group_ids
from ..partition.feistel import ALGORITHM


def _spec(v: int) -> tuple[bool, bool, bool]:
    """How Triton specialises an integer argument: == 1, divisible by 16, needs 64 bits."""
    return v == 1, v % 16 == 0, v >= 2**31


def _small(v: int) -> int:
    """A size of the same specialisation class as `v`, at most 63."""
    return v if v <= 63 else 48 + v % 16


@dataclass(frozen=True)
class BuildCall:
    """W0 + ΔW (has_base) or ΔW alone, written in `dtype`, for the weights [start, start + count)."""

    device: torch.device
    dtype: torch.dtype
    has_base: bool
    dropout: bool
    start: int
    count: int
    n: int
    d: int
    seed: int
    algorithm: str = ALGORITHM

    op = "build"

    def key(self) -> tuple:
        return (self.op, self.device, self.dtype, self.has_base, self.dropout, _spec(self.start), _spec(self.count),
                _spec(self.n), _spec(self.d), self.algorithm)


@dataclass(frozen=True)
class GradCall:
    """The fused ∂L/∂W GEMM and reduction for gy (T, M), x (T, N) in `dtype`."""

    device: torch.device
    dtype: torch.dtype
    transposed: bool
    dropout: bool
    deterministic: bool
    precision: str
    T: int
    M: int
    N: int
    start: int
    n: int
    d: int
    seed: int
    algorithm: str = ALGORITHM

    op = "grad"

    def key(self) -> tuple:
        return (self.op, self.device, self.dtype, self.transposed, self.dropout, self.deterministic, self.precision,
                _spec(self.T), _spec(self.M), _spec(self.N), _spec(self.start), _spec(self.n), _spec(self.d),
                self.algorithm)


@dataclass(frozen=True)
class IdsCall:
    """Group ids of [start, start + count) (bias gradients on the kernel path)."""

    device: torch.device
    start: int
    count: int
    n: int
    d: int
    seed: int
    algorithm: str = ALGORITHM

    op = "ids"
    dtype = torch.int32

    def key(self) -> tuple:
        return (self.op, self.device, _spec(self.start), _spec(self.count), _spec(self.n), _spec(self.d),
                self.algorithm)


# Relative error (L2 norm) allowed against an fp64 reference. Products of bf16/fp16 values are exact in fp32.
GRAD_TOLERANCE = {"ieee": 1e-5, "tf32": 1e-2}
_CHECK_KEY = 0x5EED_C0DE_5EED_C0DE  # the dropout key of check problems: any fixed key does
_CHECK_DROP = rng.drop_threshold(0.25)


def _random(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _mismatch(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> str | None:
    """None when `got` matches `ref` within relative L2 error `tol` (0: bit-exact), else a description."""
    if tol == 0:
        if torch.equal(got, ref):
            return None
        bad = int((got != ref).sum())
        return f"{what} differs from the reference in {bad} of {ref.numel()} values"
    err = float((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))
    return None if err <= tol else f"{what} has relative error {err:.2e} against the reference (allowed {tol:.0e})"


def _ids(call, count: int) -> torch.Tensor:
    """The reference ids of the check problem's `count` weights from the call's start offset (CPU, int32)."""
    return group_ids(call.algorithm, call.n, call.d, call.seed, call.start, count)


def check_build(call: BuildCall, kernels) -> str | None:
    g = torch.Generator().manual_seed(11)
    count = _small(call.count)
    theta = _random(call.d, torch.float32, call.device, g)
    weight = _random(count, call.dtype, call.device, g) if call.has_base else None
    dropout = (_CHECK_DROP, _CHECK_KEY) if call.dropout else None
    got = kernels.build_weight(weight, theta, call.start, call.n, call.d, call.seed, shape=(count,),
                               dtype=call.dtype, dropout=dropout, algorithm=call.algorithm)
    delta = theta[_ids(call, count).long().to(call.device)]
    if call.dropout:
        delta = delta.masked_fill(rng.drop_mask(call.start, count, _CHECK_KEY, _CHECK_DROP, call.device), 0.0)
    ref = (delta + weight.float() if call.has_base else delta).to(call.dtype)
    return _mismatch("W0 + ΔW" if call.has_base else "ΔW", got, ref, 0)


def check_grad(call: GradCall, kernels) -> str | None:
    g = torch.Generator().manual_seed(12)
    T, M, N = _small(call.T), _small(call.M), _small(call.N)
    gy, x = _random((T, M), call.dtype, call.device, g), _random((T, N), call.dtype, call.device, g)
    dropout = (_CHECK_DROP, _CHECK_KEY) if call.dropout else None
    runs = []
    for _ in range(2 if call.deterministic else 1):
        grad = torch.zeros(call.d, dtype=torch.float32, device=call.device)
        kernels.grad_from_gemm(grad, gy, x, call.start, call.n, call.d, call.seed, call.transposed,
                               dropout=dropout, deterministic=call.deterministic, max_members=M * N,
                               algorithm=call.algorithm)
        runs.append(grad)
    gw = gy.double().t() @ x.double()
    flat = (gw.t() if call.transposed else gw).reshape(-1)
    if call.dropout:
        flat = flat.masked_fill(rng.drop_mask(call.start, M * N, _CHECK_KEY, _CHECK_DROP, call.device), 0.0)
    ids = _ids(call, M * N).long().to(call.device)
    ref = torch.zeros(call.d, dtype=torch.float64, device=call.device).index_add_(0, ids, flat)
    if call.deterministic and not torch.equal(runs[0], runs[1]):
        return "two runs of the deterministic reduction gave different bits"
    return _mismatch("∂L/∂θ", runs[0], ref, GRAD_TOLERANCE[call.precision])


def check_ids(call: IdsCall, kernels) -> str | None:
    count = _small(call.count)
    got = kernels.group_ids_triton(call.n, call.d, call.seed, call.start, count, call.device,
                                   algorithm=call.algorithm)
    ref = _ids(call, count).to(call.device)
    return _mismatch("group ids", got, ref, 0)


CHECKS = {"build": check_build, "grad": check_grad, "ids": check_ids}


def run_check(call, kernels) -> str | None:
    """None if the kernel agrees with the reference on a small problem of `call`'s class, else why not."""
    with torch.no_grad(), torch.autocast(call.device.type, enabled=False):
        try:
            return CHECKS[call.op](call, kernels)
        except Exception as e:  # a compile error, a launch failure, an unsupported dtype: all mean "don't use it"
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
