"""The authors' two partitions (SamsungLabs/GPart, `peft/tuners/gpart`), as named gpart algorithms.

Both assign each adapted weight independently to one of d groups, so group sizes vary (multinomial) and are
counted, not closed-form; a group that gets no weight is counted as 1 (its scale is 1, and nothing uses it).
The global index i runs over the targeted modules in `named_modules()` order, each module's weight in storage
order then its bias (when biases are adapted), exactly as gpart's module spec does.

`splitmix64-mod-v1` (their `assignment_backend: stateless`, the default of their config since 2026-07-22):
    g(i) = splitmix64((seed + i) mod 2**64) mod d, every operation on unsigned 64-bit integers, where
    splitmix64(x) is one output of the SplitMix64 generator whose state was x: z = x + 0x9E3779B97F4A7C15,
    z = (z ^ z>>30) * 0xBF58476D1CE4E5B9, z = (z ^ z>>27) * 0x94D049BB133111EB, z ^ z>>31 (all mod 2**64).
    A seed outside [0, 2**64) (theirs may be negative) is taken mod 2**64. Random access, like feistel-v1: the
    GPU kernels compute it on the fly.

`torch-randint-v1` (their `assignment_backend: materialized`, and their only partition before 2026-07-22, when
    adapters had no assignment_backend): one `torch.Generator` (CPU) seeded once with the seed, then
    `torch.randint(0, d, (numel,), generator=g, dtype=torch.int32)` per module in order (weight and bias together).
    It depends on torch's CPU generator (Mersenne Twister) and its randint: a torch release that changed either
    would change the partition. The stream is sequential, so the ids are cached on every device;
    the generator state before each module is kept (about 5 KB each) so any module's ids can be rebuilt alone.

Scale (isometric): 1 / sqrt(float32(max(n_j, 1))) computed in fp32, as they compute it, so merged weights agree
with theirs to the bit.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
# Counting builds ids this many at a time: bounded scratch (8 MB of int64) whatever N is.
COUNT_CHUNK = 1 << 20


def seed64(seed: int) -> int:
    """The seed as an unsigned 64-bit value (their seeds may be negative or, in JSON, at least 2**63)."""
    return int(seed) & _MASK64


def splitmix64_mod_one(i: int, d: int, seed: int) -> int:
    """g(i) for one index, with Python ints: the definition."""
    z = (seed64(seed) + i + GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * MIX2) & _MASK64
    return (z ^ (z >> 31)) % d


def _splitmix_numpy(start: int, count: int, d: int, seed: int) -> np.ndarray:
    # NumPy uint64 arrays wrap mod 2**64 and shift logically: the arithmetic as written.
    z = np.arange(count, dtype=np.uint64)
    z += np.uint64((start + seed64(seed) + GAMMA) & _MASK64)
    z ^= z >> np.uint64(30)
    z *= np.uint64(MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return (z % np.uint64(d)).astype(np.int64)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned right shift of int64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix_torch(start: int, count: int, d: int, seed: int, device) -> torch.Tensor:
    # torch has no uint64 arithmetic on every device: int64 wraps the same bits (two's complement); shifts are
    # made logical, and the unsigned remainder of a negative pattern v is (v mod d + 2**64 mod d) mod d.
    z = torch.arange(count, dtype=torch.int64, device=device)
    z += _signed(start + seed64(seed) + GAMMA)
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    z = z ^ _shr(z, 31)
    ids = torch.remainder(z, d)
    wrap = (1 << 64) % d
    if wrap:
        ids = torch.where(z < 0, torch.remainder(ids + wrap, d), ids)
    return ids


def splitmix64_mod_ids(start: int, count: int, d: int, seed: int, device=None) -> torch.Tensor:
    """g(i) for i in [start, start + count): int64 on `device` (NumPy on the CPU, torch ops elsewhere)."""
    if device is None or torch.device(device).type == "cpu":
        return torch.from_numpy(_splitmix_numpy(start, count, d, seed))
    return _splitmix_torch(start, count, d, seed, device)


def splitmix64_mod_counts(n: int, d: int, seed: int, device=None) -> torch.Tensor:
    """n_j for every group (unclamped), counted chunk by chunk on `device`: int64 [d] on the CPU."""
    counts = torch.zeros(d, dtype=torch.int64, device=device)
    for lo in range(0, n, COUNT_CHUNK):
        ids = splitmix64_mod_ids(lo, min(COUNT_CHUNK, n - lo), d, seed, device)
        counts += torch.bincount(ids.to(counts.device), minlength=d)
    return counts.cpu()


class RandintStream:
    """torch-randint-v1: the sequential stream of per-module ids, with the generator state before each module."""

    def __init__(self, layer_sizes: list[int], d: int, seed: int) -> None:
        self.layer_sizes, self.d, self.seed = list(layer_sizes), d, seed
        self._states: list[torch.Tensor] | None = None
        self._counts: torch.Tensor | None = None

    def _draw(self, generator: torch.Generator, count: int) -> torch.Tensor:
        return torch.randint(0, self.d, (count,), generator=generator, dtype=torch.int32)

    def _walk(self) -> None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(_signed(self.seed))  # torch takes [-2**63, 2**64): the same bits as seed mod 2**64
        states, counts = [], torch.zeros(self.d, dtype=torch.int64)
        for count in self.layer_sizes:  # one module's ids alive at a time
            states.append(generator.get_state())
            counts += torch.bincount(self._draw(generator, count), minlength=self.d)
        self._states, self._counts = states, counts

    def counts(self) -> torch.Tensor:
        """n_j for every group (unclamped): int64 [d]."""
        if self._counts is None:
            self._walk()
        return self._counts

    def layer_ids(self, layer: int) -> torch.Tensor:
        """The ids of module number `layer` (weight then bias): int32 on the CPU."""
        if self._states is None:
            self._walk()
        generator = torch.Generator(device="cpu")
        generator.set_state(self._states[layer])
        return self._draw(generator, self.layer_sizes[layer])


def counted_scales(counts: torch.Tensor, isometric: bool) -> torch.Tensor:
    """The authors' per-group scale: 1/sqrt(max(n_j, 1)) in fp32 (ones when not isometric)."""
    if not isometric:
        return torch.ones(counts.numel(), dtype=torch.float32)
    return 1.0 / torch.sqrt(counts.clamp(min=1).float())
