"""The global parameter partition (docs/design.md §2.2): which of the d groups each adapted weight belongs to.

Algorithm `feistel-v1`, fixed forever (a change is a new name, never a silent edit):

1. Domain. b = the smallest even number of bits with 2**b >= N (at least 2); half = b // 2.
2. Round keys. k_r = splitmix64(seed + r + 1) & 0xFFFFFFFF for r in 0..3 (seed taken mod 2**64).
3. Round function. F(R, k) = mueller32((R ^ k) & 0xFFFFFFFF) & (2**half - 1), where
   mueller32(x): x = ((x >> 16) ^ x) * 0x45D9F3B mod 2**32, twice, then x = (x >> 16) ^ x.
4. Feistel. x = (L << half) | R; four rounds of (L, R) <- (R, L ^ F(R, k_r)): a bijection on [0, 2**b).
5. Cycle walking. pi(i) = feistel(i), re-applied while the result is >= N: a bijection on [0, N).
6. Groups. g(i) = floor(pi(i) * d / N). Group j is the contiguous run of positions
   [ceil(j*N/d), ceil((j+1)*N/d)) of the permutation, so n_j = ceil((j+1)N/d) - ceil(jN/d),
   which is floor(N/d) or ceil(N/d).

Every product stays below 2**63 (32-bit values times a 27-bit constant), so the same arithmetic gives
the same bits in Python ints, torch int64 on any device, NumPy and Triton. Nothing here uses an RNG
stream, so an adapter's partition is reproducible across machines and library versions.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GpartError
from ..rng import splitmix64

ALGORITHM = "feistel-v1"
ROUNDS = 4
MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
MUELLER = 0x45D9F3B
# Group ids are built this many indices at a time: the int64 scratch stays in cache and bounded.
_CHUNK = 1 << 16


def round_keys(seed: int) -> list[int]:
    """The four 32-bit Feistel round keys derived from `seed`."""
    return [splitmix64((seed + r + 1) & _MASK64) & MASK32 for r in range(ROUNDS)]


def half_bits(n: int) -> int:
    """Half the bit width of the Feistel domain for a permutation of [0, n)."""
    bits = max(2, (n - 1).bit_length())
    return (bits + 1) // 2


def check_d(d, n_params: int | None = None, n_modules: int | None = None, name: str = "d") -> int:
    """The one check of d, with one message wherever d comes from (a config, a recipe, a flag, the partition): an
    integer with 1 <= d <= N, N the adapted parameters (known once the targets are found; before that only d >= 1
    can be checked). `name` says where the value was written."""
    integer = isinstance(d, int) and not isinstance(d, bool)
    if integer and d >= 1 and (n_params is None or d <= n_params):
        return d
    where = f"the {n_modules} target modules hold " if n_modules else ""
    held = "" if n_params is None else f"; {where}N = {n_params:,}"
    raise GpartError(f"{name} = {f'{d:,}' if integer else repr(d)} is out of range: d must be an integer with "
                     f"1 <= d <= N, the number of adapted parameters{held}. Choose such a d (e.g. 23040)"
                     + ("" if n_params is None else " or adapt more modules"))


def check_sizes(n: int, d: int) -> None:
    """Raise `GpartError` unless 1 <= d <= n and the arithmetic fits in 63 bits."""
    if n < 1:
        raise GpartError(f"the adapted modules hold {n} parameters; select at least one weight to adapt")
    check_d(d, n)
    if n * d >= 1 << 63:
        raise GpartError(f"N * d = {n * d:,} overflows 63-bit arithmetic; use a smaller d")


# ---------------------------------------------------------------------------------------------------
# Scalar reference (pure Python ints): the definition, used by tests and documentation.
# ---------------------------------------------------------------------------------------------------

def _mueller32(x: int) -> int:
    x = (((x >> 16) ^ x) * MUELLER) & MASK32
    x = (((x >> 16) ^ x) * MUELLER) & MASK32
    return (x >> 16) ^ x


def _feistel_scalar(x: int, half: int, keys: list[int]) -> int:
    hmask = (1 << half) - 1
    left, right = x >> half, x & hmask
    for k in keys:
        left, right = right, left ^ (_mueller32((right ^ k) & MASK32) & hmask)
    return (left << half) | right


def permute_one(i: int, n: int, seed: int) -> int:
    """pi(i): the position of index `i` in the seeded permutation of [0, n)."""
    half, keys = half_bits(n), round_keys(seed)
    x = _feistel_scalar(i, half, keys)
    while x >= n:
        x = _feistel_scalar(x, half, keys)
    return x


def group_of(i: int, n: int, d: int, seed: int) -> int:
    """g(i) for a single index, computed without materialising anything."""
    return permute_one(i, n, seed) * d // n


# ---------------------------------------------------------------------------------------------------
# Vectorised torch path (CPU or GPU): bit-identical to the scalar reference.
# ---------------------------------------------------------------------------------------------------

# The same in-place code runs on NumPy arrays (CPU: about 3x faster than torch's element-wise ops on
# small integer arrays) and on torch tensors (GPU); both spell these functions alike.

def _mueller32_(x, s, xp) -> None:
    for _ in range(2):
        xp.bitwise_right_shift(x, 16, out=s)
        xp.bitwise_xor(x, s, out=x)
        xp.multiply(x, MUELLER, out=x)
        xp.bitwise_and(x, MASK32, out=x)
    xp.bitwise_right_shift(x, 16, out=s)
    xp.bitwise_xor(x, s, out=x)


def _feistel_(x, half: int, keys: list[int], xp) -> None:
    """Apply the Feistel network to int64 `x` in place (values in [0, 2**(2*half)))."""
    hmask = (1 << half) - 1
    left, right, f, s = (xp.empty_like(x) for _ in range(4))
    xp.bitwise_right_shift(x, half, out=left)
    xp.bitwise_and(x, hmask, out=right)
    for k in keys:
        xp.bitwise_xor(right, k, out=f)  # right < 2**32 and k < 2**32: no mask needed
        _mueller32_(f, s, xp)
        xp.bitwise_and(f, hmask, out=f)
        xp.bitwise_xor(left, f, out=left)
        left, right = right, left
    xp.bitwise_left_shift(left, half, out=x)
    xp.bitwise_or(x, right, out=x)


def _permute_(x, n: int, half: int, keys: list[int], xp) -> None:
    """Replace indices `x` by pi(x) in place, cycle-walking the few that land outside [0, n)."""
    _feistel_(x, half, keys, xp)
    pos = xp.nonzero(x >= n)[0] if xp is np else torch.nonzero(x >= n).squeeze(1)
    while len(pos):  # each pass touches only the still-outside elements
        walk = x[pos]
        _feistel_(walk, half, keys, xp)
        x[pos] = walk
        pos = pos[walk >= n]


def _on_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def permute(indices: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """pi(indices) for a tensor of indices in [0, n); same device, int64 result."""
    half, keys = half_bits(n), round_keys(seed)
    if indices.device.type == "cpu":
        x = indices.to(torch.int64).numpy().copy()
        _permute_(x, n, half, keys, np)
        return torch.from_numpy(x)
    x = indices.to(torch.int64).clone()
    _permute_(x, n, half, keys, torch)
    return x


def group_ids(n: int, d: int, seed: int, start: int = 0, count: int | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Group id of each adapted weight: an int32 tensor of shape [count] with values in [0, d).

    Args:
        n: N, the total number of adapted parameters.
        d: number of groups (the length of theta).
        seed: partition seed.
        start: first global index to compute (a layer's offset in the module spec).
        count: how many consecutive indices; defaults to all of [start, n).
        device: where to compute and return the ids (CPU by default).

    Raises:
        GpartError: when d is out of range or [start, start + count) is not inside [0, n).
    """
    check_sizes(n, d)
    count = n - start if count is None else count
    if start < 0 or count < 0 or start + count > n:
        raise GpartError(f"index range [{start}, {start + count}) is outside [0, {n})")
    xp = np if _on_cpu(device) else torch
    half, keys = half_bits(n), round_keys(seed)
    out = torch.empty(count, dtype=torch.int32, device=device)
    out_x = out.numpy() if xp is np else out
    for lo in range(0, count, _CHUNK):
        hi = min(count, lo + _CHUNK)
        x = (np.arange(start + lo, start + hi, dtype=np.int64) if xp is np
             else torch.arange(start + lo, start + hi, dtype=torch.int64, device=device))
        _permute_(x, n, half, keys, xp)
        out_x[lo:hi] = x * d // n
    return out


def group_sizes(n: int, d: int) -> torch.Tensor:
    """n_j for every group, from the closed form ceil((j+1)N/d) - ceil(jN/d): int64 tensor [d]."""
    check_sizes(n, d)
    j = torch.arange(d + 1, dtype=torch.int64)
    bounds = -((-j * n) // d)  # ceil(j * n / d) without floating point
    return bounds[1:] - bounds[:-1]
