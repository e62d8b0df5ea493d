"""Counter-based random numbers for ΔW dropout and θ's uniform init: a pure function of (key, global index).

The authors apply `nn.Dropout` to ΔW itself. Here the mask of weight i in a micro-batch is a hash of i and a
64-bit key that the trainer derives from (train seed, micro-batch index), so
- no W-sized mask is kept between forward and backward: backward recomputes it from the key;
- a gradient-checkpointing recompute, a resumed run and a Triton kernel all see the same mask;
- every layer's mask follows from its global index range, like its groups (docs/design.md §2.1).

Definition (`hash-v1`), all arithmetic on unsigned 32-bit words:
    lowbias32(x): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key words:    k0, k1 = low and high 32 bits of the key
    u(i):         lowbias32(lo32(i) ^ lowbias32(hi32(i) ^ k1) ^ k0)
    dropout:      weight i is dropped iff u(i) < floor(p * 2**32)
    uniform:      (u(i) + 0.5) / 2**32 in (0, 1)
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
LOWBIAS_A = 0x7FEB352D
LOWBIAS_B = 0x846CA68B
# Streams drawn from one seed: the dropout keys and the init must not share numbers.
_DROPOUT_STREAM = 0x4450  # "DP"
_INIT_STREAM = 0x494E     # "IN"


def splitmix64(x: int) -> int:
    """One output of the splitmix64 mixer for state `x` (64-bit unsigned arithmetic)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def micro_batch_key(seed: int, index: int) -> int:
    """The 64-bit dropout key of micro-batch `index` of a run with train seed `seed`."""
    return splitmix64((splitmix64((seed ^ (_DROPOUT_STREAM << 48)) & _MASK64) + index) & _MASK64)


def init_key(seed: int) -> int:
    """The 64-bit key of θ's uniform initialisation for `seed`."""
    return splitmix64((seed ^ (_INIT_STREAM << 48)) & _MASK64)


def drop_threshold(p: float) -> int:
    """u(i) < threshold drops weight i: floor(p * 2**32)."""
    return int(p * 2**32)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """In place on a uint32 array (NumPy wraps uint32 products mod 2**32)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(LOWBIAS_A)
    x ^= x >> np.uint32(15)
    x *= np.uint32(LOWBIAS_B)
    x ^= x >> np.uint32(16)
    return x


def lowbias32_int(x: int) -> int:
    """The same mixer on one Python int (the scalar definition)."""
    x ^= x >> 16
    x = (x * LOWBIAS_A) & _MASK32
    x ^= x >> 15
    x = (x * LOWBIAS_B) & _MASK32
    return x ^ (x >> 16)


def hash_one(i: int, key: int) -> int:
    """u(i) for a single global index (the reference the vectorised code is tested against)."""
    k0, k1 = key & _MASK32, key >> 32
    return lowbias32_int((i & _MASK32) ^ lowbias32_int((i >> 32) ^ k1) ^ k0)


def hashes(start: int, count: int, key: int) -> np.ndarray:
    """u(i) for i in [start, start + count): uint32 array of shape [count]."""
    out = np.empty(count, dtype=np.uint32)
    k0, k1 = key & _MASK32, key >> 32
    pos = 0
    while pos < count:  # one pass per 2**32-aligned span (the high word is constant inside it)
        i = start + pos
        span = min(count - pos, (1 << 32) - (i & _MASK32))
        salt = np.uint32(lowbias32_int((i >> 32) ^ k1) ^ k0)
        chunk = out[pos:pos + span]
        np.bitwise_xor(np.arange(i & _MASK32, (i & _MASK32) + span, dtype=np.uint32), salt, out=chunk)
        _lowbias32(chunk)
        pos += span
    return out


# Elements per chunk of the on-device hash: bounds its int64 temporaries to a few hundred MB on a 70B layer.
_TORCH_CHUNK = 1 << 24


def _mul32_(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x = x * factor mod 2**32, in place on int64 values in [0, 2**32): the product is split at 16 bits of
    `factor` so that no intermediate leaves int64 (a signed overflow would be undefined)."""
    low = x * (factor & 0xFFFF)
    return x.mul_(factor >> 16).bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(low).bitwise_and_(_MASK32)


def _lowbias32_torch(x: torch.Tensor) -> torch.Tensor:
    """`_lowbias32` in place on an int64 tensor of values in [0, 2**32)."""
    x ^= x >> 16
    _mul32_(x, LOWBIAS_A)
    x ^= x >> 15
    _mul32_(x, LOWBIAS_B)
    x ^= x >> 16
    return x


def _torch_chunks(start: int, count: int, key: int, device: torch.device | str):
    """(position, u(i) as int64) for the chunks of [start, start + count), hashed on `device` with torch ops."""
    k0, k1 = key & _MASK32, key >> 32
    pos = 0
    while pos < count:  # one chunk at most per 2**32-aligned span (the high word is constant inside it)
        i = start + pos
        span = min(count - pos, (1 << 32) - (i & _MASK32), _TORCH_CHUNK)
        salt = lowbias32_int((i >> 32) ^ k1) ^ k0
        chunk = torch.arange(i & _MASK32, (i & _MASK32) + span, dtype=torch.int64, device=device)
        yield pos, _lowbias32_torch(chunk.bitwise_xor_(salt))
        pos += span


def hashes_torch(start: int, count: int, key: int, device: torch.device | str) -> torch.Tensor:
    """`hashes` computed on `device` with torch integer ops (the same bits): int64 [count] in [0, 2**32)."""
    out = torch.empty(count, dtype=torch.int64, device=device)
    for pos, u in _torch_chunks(start, count, key, device):
        out[pos:pos + u.numel()] = u
    return out


def drop_mask(start: int, count: int, key: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [count]: True where weight i of [start, start + count) is dropped.

    Built where it is used: with NumPy on the CPU, with torch integer ops on any other device (a GPU without the
    Triton kernels), so no W-sized mask is hashed on the host and copied over on every call.
    """
    if torch.device(device).type == "cpu":
        return torch.from_numpy(hashes(start, count, key) < np.uint32(threshold))
    return torch_drop_mask(start, count, key, threshold, device)


def torch_drop_mask(start: int, count: int, key: int, threshold: int, device: torch.device | str) -> torch.Tensor:
    """`drop_mask` computed on `device` by torch ops, a chunk at a time."""
    drop = torch.empty(count, dtype=torch.bool, device=device)
    for pos, u in _torch_chunks(start, count, key, device):
        torch.lt(u, threshold, out=drop[pos:pos + u.numel()])
    return drop


def uniform(count: int, key: int) -> torch.Tensor:
    """fp32 [count] in (0, 1): u(i) for i in [0, count), centred in its 2**-32 bin."""
    u = hashes(0, count, key).astype(np.float64)
    return torch.from_numpy((u + 0.5) / 2.0**32).float()
