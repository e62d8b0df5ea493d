"""A partition's identity (docs/design.md §2.1): everything that fixes P, as one frozen value.

P depends on the algorithm, the adapted weights in their canonical order (the module spec, which fixes N), d, the
seed, and whether groups are scaled by 1/√n (isometric). Two adapters whose specs are equal share P, so their θ live
in one space: one can be swapped for the other, continued from the other, or subtracted from a merge of the other.
Every place that must refuse a different P compares two `PartitionSpec`s and reports `diff`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Target:
    """One adapted module of the module spec: its name, weight shape, and whether its bias is adapted too."""

    name: str
    shape: tuple[int, ...]
    bias: bool

    def record(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "bias": self.bias}


@dataclass(frozen=True)
class Difference:
    """One field in which two specs differ; `str()` reads "d 256 vs 512" (ours, then theirs)."""

    field: str   # a `PartitionSpec` field name
    ours: object
    theirs: object
    detail: str = ""  # for targets: which modules differ

    def __str__(self) -> str:
        if self.field == "targets":
            return f"targets differ ({self.detail})"
        return f"{self.field} {self.ours!r} vs {self.theirs!r}"


@dataclass(frozen=True)
class PartitionSpec:
    """What fixes P. Built from a `.gpart` file's metadata or a model's GPart state (`from_record`)."""

    algorithm: str
    n_params: int
    d: int
    seed: int
    isometric: bool
    targets: tuple[Target, ...]

    @classmethod
    def from_record(cls, record: Mapping) -> PartitionSpec:
        """From the artifact's metadata names: partition, n_params, d, seed, isometric, targets ([{name, shape,
        bias}])."""
        targets = tuple(Target(t["name"], tuple(t["shape"]), bool(t["bias"])) for t in record["targets"])
        return cls(record["partition"], record["n_params"], record["d"], record["seed"], record["isometric"], targets)

    def diff(self, other: PartitionSpec, ours: str = "ours", theirs: str = "theirs") -> list[Difference]:
        """Every field in which `other` differs from this spec, in field order (empty: the same P); `ours` and
        `theirs` name the two sides in the targets' detail."""
        out = [Difference(name, getattr(self, name), getattr(other, name))
               for name in ("algorithm", "n_params", "d", "seed", "isometric")
               if getattr(self, name) != getattr(other, name)]
        if self.targets != other.targets:
            detail = targets_diff(self.targets, other.targets, ours, theirs)
            out.append(Difference("targets", self.targets, other.targets, detail))
        return out


def targets_diff(a: tuple[Target, ...], b: tuple[Target, ...], ours: str = "ours", theirs: str = "theirs") -> str:
    """Which modules differ between two module specs (`ours` names `a`'s side, `theirs` `b`'s): missing on either
    side, other shapes or bias, or the same modules in another order."""
    mine, other = {t.name: t for t in a}, {t.name: t for t in b}
    lines = [f"only in {ours}: {n}" for n in mine if n not in other][:5]
    lines += [f"only in {theirs}: {n}" for n in other if n not in mine][:5]
    lines += [f"{n}: {ours} {list(mine[n].shape)} bias={mine[n].bias}, {theirs} {list(other[n].shape)} "
              f"bias={other[n].bias}" for n in mine if n in other and mine[n] != other[n]][:5]
    if not lines and [t.name for t in a] != [t.name for t in b]:
        lines.append("same modules in a different order")
    return "; ".join(lines)
