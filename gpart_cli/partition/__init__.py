"""Which partition algorithm an adapter uses (docs/design.md §2), and one object that answers for it.

- `feistel-v1` (gpart's default, `gpart_cli.partition.feistel`): a seeded permutation cut into d near-equal groups,
  sizes closed-form.
- `splitmix64-mod-v1` and `torch-randint-v1` (the authors' two backends, `gpart_cli.partition.authors`):
  independent assignment, sizes counted.

The algorithm id travels from the recipe (`method.partition`) and the `.gpart` metadata through `GPartConfig` to
each layer's `Partition` and from there to the kernels: nothing below assumes Feistel.
"""

from __future__ import annotations

import torch

from ..errors import GpartError
from . import authors, feistel

FEISTEL = feistel.ALGORITHM
SPLITMIX = "splitmix64-mod-v1"
RANDINT = "torch-randint-v1"
ALGORITHMS = (FEISTEL, SPLITMIX, RANDINT)
# Group ids computable from the global index alone: the Triton kernels compute these on the fly.
ON_THE_FLY = (FEISTEL, SPLITMIX)


def check_algorithm(name, field: str = "method.partition") -> str:
    """`name` if it is a known algorithm id, else a `GpartError` naming `field` and the choices."""
    if name not in ALGORITHMS:
        raise GpartError(f"{field} = {name!r} is not a known partition algorithm; use one of {', '.join(ALGORITHMS)}")
    return name


def group_ids(algorithm: str, n: int, d: int, seed: int, start: int, count: int, device=None) -> torch.Tensor:
    """Ids of [start, start + count) for an on-the-fly algorithm: int32 on `device` (CPU by default)."""
    if algorithm == FEISTEL:
        return feistel.group_ids(n, d, seed, start, count, device=device)
    if algorithm == SPLITMIX:
        return authors.splitmix64_mod_ids(start, count, d, seed, device).int()
    raise GpartError(f"partition {algorithm!r} has no random access: its ids come from the module-by-module stream")


class Partition:
    """One adapter's partition: algorithm, N, d, seed, and the adapted size of each module in order.

    Args:
        algorithm: one of `ALGORITHMS`.
        n: N, the adapted parameter count.
        d: number of groups.
        seed: partition seed.
        layer_sizes: weight + bias count of each module in module-spec order (torch-randint-v1 draws per module).
    """

    def __init__(self, algorithm: str, n: int, d: int, seed: int, layer_sizes: list[int] | None = None) -> None:
        self.algorithm, self.n, self.d, self.seed = check_algorithm(algorithm), n, d, seed
        sizes = list(layer_sizes) if layer_sizes is not None else [n]
        self.layer_sizes = sizes
        self._layer_of = {}  # start offset -> module number (torch-randint-v1)
        offset = 0
        for i, size in enumerate(sizes):
            self._layer_of[offset] = i
            offset += size
        self._stream = authors.RandintStream(sizes, d, seed) if algorithm == RANDINT else None
        self._counts: torch.Tensor | None = None

    @property
    def on_the_fly(self) -> bool:
        return self.algorithm in ON_THE_FLY

    def ids(self, start: int, count: int, device=None) -> torch.Tensor:
        """Group ids of the weights [start, start + count): int32 on `device` (built there on a GPU).

        torch-randint-v1 answers for whole modules only (`start` a module's offset, `count` its size).
        """
        if self._stream is None:
            return group_ids(self.algorithm, self.n, self.d, self.seed, start, count, device)
        layer = self._layer_of.get(start)
        if layer is None or self._stream.layer_sizes[layer] != count:
            raise GpartError(f"internal: torch-randint-v1 ids are drawn per module; [{start}, {start + count}) "
                             f"is not one module's range")
        ids = self._stream.layer_ids(layer)
        return ids if device is None else ids.to(device)

    def counts(self, device=None) -> torch.Tensor:
        """n_j for every group (int64 [d], CPU); counted on `device` chunk by chunk where they are not closed-form."""
        if self._counts is None:
            if self.algorithm == FEISTEL:
                self._counts = feistel.group_sizes(self.n, self.d)
            elif self.algorithm == SPLITMIX:
                self._counts = authors.splitmix64_mod_counts(self.n, self.d, self.seed, device)
            else:
                self._counts = self._stream.counts()
        return self._counts

    def max_members(self) -> int:
        """The largest group's size: bounds a group's sum in the deterministic kernel reduction."""
        return -(-self.n // self.d) if self.algorithm == FEISTEL else int(self.counts().max())

    def scales(self, isometric: bool, device=None) -> torch.Tensor:
        """What theta_j is multiplied by: fp32 [d], CPU.

        feistel-v1: 1/sqrt(n_j) rounded once from fp64 (gpart's definition). The authors' algorithms: their fp32
        1/sqrt(max(n_j, 1)), so that merged weights agree with theirs bit for bit.
        """
        if self.algorithm == FEISTEL:
            return self.counts().double().rsqrt().float() if isometric else torch.ones(self.d)
        if not isometric:
            return torch.ones(self.d, dtype=torch.float32)
        return authors.counted_scales(self.counts(device), isometric)
