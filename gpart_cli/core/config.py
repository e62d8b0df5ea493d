"""`GPartConfig`: what to adapt and how (docs/design.md §1, §8)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

from ..errors import GpartError
from ..partition import FEISTEL, check_algorithm
from ..partition.feistel import check_d


@dataclass(frozen=True)
class GPartConfig:
    """Settings of one GPart adapter.

    Args:
        d: length of theta, the number of partition groups (1 <= d <= N).
        seed: partition seed; with d and the module spec it fixes the partition forever.
        target_modules: module names to adapt. A list matches a module whose full name equals an entry or
            ends with "." + entry; a single string is a regular expression matched against the full name.
        bias: also adapt the biases of the target modules.
        isometric: scale group j by 1/sqrt(n_j) so that P^T P = I (False is the paper's ablation).
        head_modules: modules trained densely and stored beside theta (e.g. a classifier head).
        partition: the partition algorithm id: feistel-v1 (default), or the authors' splitmix64-mod-v1 /
            torch-randint-v1 (see `gpart_cli.partitions`).
        dropout: probability p of dropping each weight of ΔW in training (the authors' `nn.Dropout` on ΔW;
            kept values scaled by 1/(1-p)); off in eval mode and in merge. 0 <= p < 1.
        init_bound: theta starts uniform in [-init_bound, init_bound]; 0 (default) starts at exactly 0.
        init_seed: seed of that uniform start (default: `seed`).
    """

    d: int
    seed: int = 0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    bias: bool = False
    isometric: bool = True
    head_modules: tuple[str, ...] = field(default_factory=tuple)
    partition: str = FEISTEL
    dropout: float = 0.0
    init_bound: float = 0.0
    init_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.head_modules, (list, str)):
            heads = (self.head_modules,) if isinstance(self.head_modules, str) else tuple(self.head_modules)
            object.__setattr__(self, "head_modules", heads)
        check_d(self.d)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise GpartError(f"seed = {self.seed!r} is invalid: it must be a non-negative integer")
        if not self.target_modules:
            raise GpartError("target_modules is empty: name the modules to adapt, e.g. [q_proj, v_proj]")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            raise GpartError(f"dropout = {self.dropout!r} is invalid: it must be a probability in [0, 1), e.g. 0.1")
        if not _number(self.init_bound) or not 0 <= self.init_bound < math.inf:
            raise GpartError(f"init_bound = {self.init_bound!r} is invalid: it must be a finite number >= 0 "
                             f"(0 starts theta at exactly zero)")
        if self.init_seed is None:
            object.__setattr__(self, "init_seed", self.seed)
        elif isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise GpartError(f"init_seed = {self.init_seed!r} is invalid: it must be a non-negative integer")
        check_algorithm(self.partition, "partition")

    @classmethod
    def from_fields(cls, source, **given) -> "GPartConfig":
        """The config from an object carrying the `FROM_RECIPE` fields by name (a recipe's method section), plus
        `given` (target and head modules, init seed)."""
        return cls(**{name: getattr(source, name) for name in FROM_RECIPE}, **given)


# The one list of GPartConfig fields each place reuses by name (the module lists travel in their own shapes: the
# artifact stores the exact targets as its module spec and the heads in its task; a recipe lists them as given).
# FROM_RECIPE: set by a recipe's `method` section under the same names, with the same defaults.
FROM_RECIPE = ("d", "seed", "partition", "bias", "isometric", "dropout", "init_bound")
# STORED: written into a .gpart file's metadata under the same names, read back by `Artifact.config`, shown by
# `gpart inspect`.
STORED = ("d", "seed", "partition", "isometric", "dropout", "init_bound", "init_seed")


def default(name: str):
    """The default of GPartConfig field `name`."""
    return next(f.default for f in fields(GPartConfig) if f.name == name)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
