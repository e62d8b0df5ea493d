"""Triton kernels for the GPU path (docs/design.md §3.3): group ids computed on the fly, zero bytes of partition state.

- `build_weight`: W0 + ΔW (or ΔW alone, for a quantized base) with ΔW_i = theta_scaled[g(i)], g(i) from
  (global index, seed, d, N) with the arithmetic of the adapter's algorithm (bit-identical ids): feistel-v1
  (`gpart_cli.partition.feistel`) or splitmix64-mod-v1 (`gpart_cli.partition.authors`), chosen by the ALGO
  compile-time switch; and the ΔW dropout mask of `gpart_cli.rng` when training with dropout.
- `grad_from_gemm`: dL/dW = gy^T x computed tile by tile in registers and reduced straight into dL/dθ, so
  dL/dW is never written to memory. The reduction is either fp32 atomics (fast, order-dependent) or, when
  torch's deterministic algorithms are on, int64 fixed-point atomics: integer addition is associative, so
  the result is the same bits whatever order the tiles land in.
- `group_ids_triton`: the ids themselves (for tests, bias gradients and the self-check).

Numerics: tl.dot runs on fp32 operands. bf16/fp16 inputs are upcast first: their values are exact in tf32,
so the tf32 tensor-core path multiplies them exactly and accumulates in fp32 (no bf16 tl.dot, which needs
sm80+ and which Triton's interpreter cannot check). fp32 inputs use input_precision "ieee" unless
`torch.backends.cuda.matmul.allow_tf32` is set, as torch's own matmuls do. All address arithmetic is int64.

Every kernel runs on CPU tensors under `TRITON_INTERPRET=1`, which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..partition import FEISTEL, ON_THE_FLY, SPLITMIX
from ..partition.authors import GAMMA, MIX1, MIX2, seed64
from ..partition.feistel import MASK32, MUELLER, half_bits, round_keys
from ..rng import LOWBIAS_A, LOWBIAS_B
from .launch import dot_precision

# The jitted constants below mirror partition.py and rng.py.
assert MASK32 == 0xFFFFFFFF and MUELLER == 0x45D9F3B and LOWBIAS_A == 0x7FEB352D and LOWBIAS_B == 0x846CA68B
assert MIX1 == 0xBF58476D1CE4E5B9 and MIX2 == 0x94D049BB133111EB
ALGO_ID = {FEISTEL: 0, SPLITMIX: 1}  # the ALGO switch of each kernel


@triton.jit
def _mueller32(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@triton.jit
def _feistel(x, half, hmask, k0, k1, k2, k3):
    left = x >> half
    right = x & hmask
    f = _mueller32(right ^ k0) & hmask
    left, right = right, left ^ f
    f = _mueller32(right ^ k1) & hmask
    left, right = right, left ^ f
    f = _mueller32(right ^ k2) & hmask
    left, right = right, left ^ f
    f = _mueller32(right ^ k3) & hmask
    left, right = right, left ^ f
    return (left << half) | right


@triton.jit
def _feistel_group(idx, n, d, half, hmask, k0, k1, k2, k3):
    x = _feistel(idx, half, hmask, k0, k1, k2, k3)
    outside = x >= n
    while tl.max(outside.to(tl.int32), axis=0) > 0:  # cycle-walking: few lanes, few passes
        x = tl.where(outside, _feistel(x, half, hmask, k0, k1, k2, k3), x)
        outside = x >= n
    return x * d // n


@triton.jit
def _splitmix_group(idx, d, base_hi, base_lo):
    """splitmix64(seed + idx) mod d in uint64 lanes; base = seed + GAMMA (mod 2**64) arrives as two 32-bit halves."""
    # tl.cast, not .to: Triton passes an integer argument equal to 1 as a Python int (d = 1 is a valid partition).
    base = (tl.cast(base_hi, tl.uint64) << 32) | tl.cast(base_lo, tl.uint64)
    z = idx.to(tl.uint64) + base
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z % tl.cast(d, tl.uint64)).to(tl.int64)


@triton.jit
def _group(idx, n, d, half, hmask, k0, k1, k2, k3, ALGO: tl.constexpr):
    """g(idx) for a 1-D int64 block of global indices (masked-out lanes must hold a valid index, e.g. 0)."""
    if ALGO == 1:
        return _splitmix_group(idx, d, k0, k1)
    else:
        return _feistel_group(idx, n, d, half, hmask, k0, k1, k2, k3)


@triton.jit
def _lowbias32(x):
    # x holds 32-bit values in int64 lanes: products stay below 2**64 and wrap harmlessly; masks keep 32 bits.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _dropped(idx, drop_thr, dk0, dk1):
    """True where weight idx (int64) is dropped: rng.hash-v1 u(idx) < drop_thr."""
    salt = _lowbias32((idx >> 32) ^ dk1) ^ dk0
    return _lowbias32((idx & 0xFFFFFFFF) ^ salt) < drop_thr


# Arguments derived from the seed or the dropout key are data, not sizes: never specialised (a key that happens to
# equal 1 or a multiple of 16 would otherwise compile a kernel of its own, a class the self-check does not key on).
_KEYS = ("half", "hmask", "k0", "k1", "k2", "k3")
_DROP_KEYS = ("drop_thr", "dk0", "dk1")


@triton.jit(do_not_specialize=_KEYS)
def _ids_kernel(out_ptr, start, count, n, d, half, hmask, k0, k1, k2, k3, ALGO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    idx = tl.where(mask, start + offs, 0)
    g = _group(idx, n, d, half, hmask, k0, k1, k2, k3, ALGO)
    tl.store(out_ptr + offs, g.to(tl.int32), mask=mask)


@triton.jit
def _to_bf16_rne(v):
    """fp32 -> bf16 rounded to nearest even with integer ops, as torch rounds (Triton's interpreter truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=_KEYS + _DROP_KEYS)
def _build_kernel(w_ptr, theta_ptr, out_ptr, start, count, n, d, half, hmask, k0, k1, k2, k3, drop_thr, dk0, dk1,
                  ALGO: tl.constexpr, HAS_BASE: tl.constexpr, DROPOUT: tl.constexpr, OUT_BF16: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    idx = tl.where(mask, start + offs, 0)
    g = _group(idx, n, d, half, hmask, k0, k1, k2, k3, ALGO)
    t = tl.load(theta_ptr + g, mask=mask, other=0.0)
    if DROPOUT:
        t = tl.where(_dropped(idx, drop_thr, dk0, dk1), 0.0, t)
    if HAS_BASE:
        t = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + t
    if OUT_BF16:
        tl.store(out_ptr + offs, _to_bf16_rne(t), mask=mask)
    else:
        tl.store(out_ptr + offs, t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_KEYS + _DROP_KEYS)
def _grad_kernel(gy_ptr, x_ptr, grad_ptr, fixed_ptr, T, M, N, stride_gt, stride_gm, stride_xt, stride_xn,
                 start, idx_sm, idx_sn, n, d, half, hmask, k0, k1, k2, k3, drop_thr, dk0, dk1,
                 ALGO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
                 FIXED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) tile of dL/dW = gy^T x, reduced into grad[g(i)] with atomics."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, T, BLOCK_K):
        kk = kb + rk                                                               # int64: kk * stride never wraps
        a = tl.load(gy_ptr + kk[None, :] * stride_gt + rm[:, None] * stride_gm,
                    mask=(rm[:, None] < M) & (kk[None, :] < T), other=0.0)        # (BM, BK) = gy^T tile
        b = tl.load(x_ptr + kk[:, None] * stride_xt + rn[None, :] * stride_xn,
                    mask=(kk[:, None] < T) & (rn[None, :] < N), other=0.0)        # (BK, BN) = x tile
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    idx = tl.where(mask, start + rm[:, None] * idx_sm + rn[None, :] * idx_sn, 0)
    # _group's cycle-walking loop reduces over one axis: run it on the flattened tile.
    flat = tl.reshape(idx, (BLOCK_M * BLOCK_N,))
    g = tl.reshape(_group(flat, n, d, half, hmask, k0, k1, k2, k3, ALGO), (BLOCK_M, BLOCK_N))
    if DROPOUT:
        acc = tl.where(_dropped(idx, drop_thr, dk0, dk1), 0.0, acc)
    if FIXED:
        # Fixed point: round(acc * 2**e) as int64; the host chose e so no group sum can overflow.
        v = acc.to(tl.float64) * tl.load(fixed_ptr)
        q = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int64)
        tl.atomic_add(grad_ptr + g, q, mask=mask)
    else:
        tl.atomic_add(grad_ptr + g, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers. Callers pass tensors on one device and hold the device guard (see `launch.device_guard`).
# ---------------------------------------------------------------------------------------------------

_BLOCK = 1024
GRAD_BLOCKS = (64, 64, 32)


def partition_args(n: int, seed: int, algorithm: str = FEISTEL) -> tuple[int, ...]:
    """(half, hmask, k0, k1, k2, k3) of `_group`: feistel-v1's domain and round keys, or, for splitmix64-mod-v1,
    k0/k1 = the high/low 32 bits of seed + GAMMA (mod 2**64) and zeros elsewhere."""
    if algorithm not in ON_THE_FLY:
        raise ValueError(f"partition {algorithm!r} has no on-the-fly kernel")
    if algorithm == SPLITMIX:
        base = (seed64(seed) + GAMMA) & ((1 << 64) - 1)
        return 0, 0, base >> 32, base & MASK32, 0, 0
    half = half_bits(n)
    return (half, (1 << half) - 1, *round_keys(seed))


def dropout_args(dropout: tuple[int, int] | None) -> tuple[int, int, int]:
    """(threshold, k0, k1) for a (threshold, key) pair, or a no-op triple."""
    if dropout is None:
        return 0, 0, 0
    threshold, key = dropout
    return threshold, key & MASK32, key >> 32


def group_ids_triton(n: int, d: int, seed: int, start: int, count: int, device, algorithm: str = FEISTEL
                     ) -> torch.Tensor:
    out = torch.empty(count, dtype=torch.int32, device=device)
    _ids_kernel[(triton.cdiv(count, _BLOCK),)](out, start, count, n, d, *partition_args(n, seed, algorithm),
                                               ALGO=ALGO_ID[algorithm], BLOCK=_BLOCK)
    return out


def build_weight(weight: torch.Tensor | None, theta_scaled: torch.Tensor, start: int, n: int, d: int, seed: int,
                 *, shape=None, dtype=None, dropout: tuple[int, int] | None = None, algorithm: str = FEISTEL
                 ) -> torch.Tensor:
    """W0 + ΔW in the base dtype (summed in fp32, one rounding), or ΔW alone (`weight` None: give shape, dtype)."""
    theta_scaled = theta_scaled.float().contiguous()
    w = weight.contiguous() if weight is not None else theta_scaled  # a placeholder pointer without a base
    out = torch.empty(shape if weight is None else w.shape, dtype=dtype or w.dtype, device=theta_scaled.device)
    count = out.numel()
    _build_kernel[(triton.cdiv(count, _BLOCK),)](w, theta_scaled, out, start, count, n, d,
                                                 *partition_args(n, seed, algorithm), *dropout_args(dropout),
                                                 ALGO=ALGO_ID[algorithm], HAS_BASE=weight is not None,
                                                 DROPOUT=dropout is not None, OUT_BF16=out.dtype == torch.bfloat16,
                                                 BLOCK=_BLOCK)
    return out


def fixed_point_scale(gy: torch.Tensor, x: torch.Tensor, max_members: int) -> torch.Tensor:
    """2**e (fp64, on the device, no host sync) such that every group's fixed-point sum fits in 62 bits.

    |dL/dW_mn| <= T * max|gy| * max|x|, and a group has at most `max_members` weights in a layer. amax is
    exact and order-free, so e is the same on every run.
    """
    bound = gy.abs().amax().double() * x.abs().amax().double() * (gy.shape[0] * max_members)
    e = 61 - torch.ceil(torch.log2(torch.clamp(bound, min=2.0**-960)))
    return torch.exp2(torch.clamp(e, max=1000.0)).reshape(1)


def grad_from_gemm(grad_theta: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, start: int, n: int, d: int,
                   seed: int, transposed: bool, *, dropout: tuple[int, int] | None = None,
                   deterministic: bool = False, max_members: int = 1, algorithm: str = FEISTEL) -> None:
    """grad_theta[g(i)] += (gy^T x)_i for the layer's weights; gy (T, out), x (T, in), grad_theta fp32 [d].

    nn.Linear stores W as (out, in): weight (m, k) has global index start + m*in + k. Conv1D stores (in, out).
    """
    T, M = gy.shape
    N = x.shape[1]
    idx_sm, idx_sn = (1, M) if transposed else (N, 1)
    precision, upcast = dot_precision(gy.dtype, gy.device)
    bm, bn, bk = GRAD_BLOCKS
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    if deterministic:
        target = torch.zeros(grad_theta.shape, dtype=torch.int64, device=grad_theta.device)
        scale = fixed_point_scale(gy, x, max_members)
    else:
        target, scale = grad_theta, grad_theta  # the scale pointer is unused without FIXED
    _grad_kernel[grid](gy, x, target, scale, T, M, N, gy.stride(0), gy.stride(1), x.stride(0), x.stride(1),
                       start, idx_sm, idx_sn, n, d, *partition_args(n, seed, algorithm), *dropout_args(dropout),
                       ALGO=ALGO_ID[algorithm], PRECISION=precision, UPCAST=upcast, DROPOUT=dropout is not None, FIXED=deterministic,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if deterministic:
        grad_theta += (target.double() / scale).float()
