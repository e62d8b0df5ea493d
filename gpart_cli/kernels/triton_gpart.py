"""Triton kernels for the GPU path (DESIGN §3): group ids computed on the fly, zero bytes of partition state.

- `effective_weight`: W_eff = W0 + theta_scaled[g(i)] for every weight, g(i) from (global index, seed, d, N)
  with the same feistel-v1 integer arithmetic as `gpart_cli.partition` (bit-identical ids).
- `grad_theta_from_gemm`: dL/dW = gy^T x computed tile by tile in registers and reduced straight into
  dL/dtheta with atomics, so dL/dW is never written to memory.
- `group_ids_triton`: the ids themselves (for tests and for checking against the CPU path).

All kernels run on CPU tensors under `TRITON_INTERPRET=1`, which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..partition import _MASK32, _MUELLER, half_bits, round_keys


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
def _group(idx, n, d, half, hmask, k0, k1, k2, k3):
    """g(idx) for an int64 block of global indices (masked-out lanes must hold a valid index, e.g. 0)."""
    x = _feistel(idx, half, hmask, k0, k1, k2, k3)
    outside = x >= n
    while tl.max(outside.to(tl.int32), axis=0) > 0:  # cycle-walking: few lanes, few passes
        x = tl.where(outside, _feistel(x, half, hmask, k0, k1, k2, k3), x)
        outside = x >= n
    return x * d // n


@triton.jit
def _ids_kernel(out_ptr, start, count, n, d, half, hmask, k0, k1, k2, k3, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    idx = tl.where(mask, start + offs.to(tl.int64), 0)
    g = _group(idx, n, d, half, hmask, k0, k1, k2, k3)
    tl.store(out_ptr + offs, g.to(tl.int32), mask=mask)


@triton.jit
def _effective_kernel(w_ptr, theta_ptr, out_ptr, start, count, n, d, half, hmask, k0, k1, k2, k3,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    idx = tl.where(mask, start + offs.to(tl.int64), 0)
    g = _group(idx, n, d, half, hmask, k0, k1, k2, k3)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(theta_ptr + g, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (w + t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_gemm_kernel(gy_ptr, x_ptr, grad_ptr, T, M, N, stride_gt, stride_gm, stride_xt, stride_xn,
                      start, idx_sm, idx_sn, n, d, half, hmask, k0, k1, k2, k3,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) tile of dL/dW = gy^T x, reduced into grad[g(i)] with atomics."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0_ in range(0, T, BLOCK_K):
        kk = k0_ + rk
        a = tl.load(gy_ptr + kk[None, :] * stride_gt + rm[:, None] * stride_gm,
                    mask=(rm[:, None] < M) & (kk[None, :] < T), other=0.0)       # (BM, BK) = gy^T tile
        b = tl.load(x_ptr + kk[:, None] * stride_xt + rn[None, :] * stride_xn,
                    mask=(kk[:, None] < T) & (rn[None, :] < N), other=0.0)       # (BK, BN) = x tile
        acc += tl.dot(a, b)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    idx = tl.where(mask, start + rm[:, None].to(tl.int64) * idx_sm + rn[None, :].to(tl.int64) * idx_sn, 0)
    # _group's cycle-walking loop reduces over one axis: run it on the flattened tile.
    flat = tl.reshape(idx, (BLOCK_M * BLOCK_N,))
    g = tl.reshape(_group(flat, n, d, half, hmask, k0, k1, k2, k3), (BLOCK_M, BLOCK_N))
    tl.atomic_add(grad_ptr + g, acc, mask=mask)


def _params(n: int, seed: int) -> tuple[int, ...]:
    half = half_bits(n)
    return (half, (1 << half) - 1, *round_keys(seed))


_BLOCK = 1024


def group_ids_triton(n: int, d: int, seed: int, start: int, count: int, device) -> torch.Tensor:
    out = torch.empty(count, dtype=torch.int32, device=device)
    grid = (triton.cdiv(count, _BLOCK),)
    _ids_kernel[grid](out, start, count, n, d, *_params(n, seed), BLOCK=_BLOCK)
    return out


def effective_weight(weight: torch.Tensor, theta_scaled: torch.Tensor, start: int, n: int, d: int,
                     seed: int) -> torch.Tensor:
    """W0 + ΔW in the base dtype (sum in fp32), computing each weight's group on the fly."""
    w = weight.contiguous()
    out = torch.empty_like(w)
    count = w.numel()
    _effective_kernel[(triton.cdiv(count, _BLOCK),)](w, theta_scaled.contiguous(), out, start, count, n, d,
                                                     *_params(n, seed), BLOCK=_BLOCK)
    return out


def grad_theta_from_gemm(grad_theta: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, start: int, n: int, d: int,
                         seed: int, transposed: bool) -> None:
    """grad_theta[g(i)] += (gy^T x)_i for the layer's weights; gy (T, out), x (T, in), grad_theta fp32 [d].

    nn.Linear stores W as (out, in): weight (m, k) has global index start + m*in + k. Conv1D stores (in, out).
    """
    T, M = gy.shape
    N = x.shape[1]
    idx_sm, idx_sn = (1, M) if transposed else (N, 1)
    blocks = (64, 64, 32)
    grid = (triton.cdiv(M, blocks[0]), triton.cdiv(N, blocks[1]))
    _grad_gemm_kernel[grid](gy, x, grad_theta, T, M, N, gy.stride(0), gy.stride(1), x.stride(0), x.stride(1),
                            start, idx_sm, idx_sn, n, d, *_params(n, seed),
                            BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])


assert _MASK32 == 0xFFFFFFFF and _MUELLER == 0x45D9F3B  # the jitted constants above mirror partition.py
