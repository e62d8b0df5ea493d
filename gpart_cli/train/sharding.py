"""Which rows of a training step each data-parallel rank runs, so that any world size gives the single-process step.

In one process a step is `grad_accum` micro-batches of `batch_size` rows (an epoch's last one may be shorter).
Each micro-batch's loss is a mean over its *loss units* (rows for classification, label tokens for SFT) and the
step's gradient is the average of those means over the micro-batches. Over W ranks the same gradient comes out:

- The step's micro-batches are dealt to g = gcd(grad_accum, W) groups of W/g consecutive ranks; every rank runs
  grad_accum/g forward passes, the same count everywhere, as DDP's and FSDP's collectives require. With
  grad_accum = W (MetaMath's 2 x 8 on 8 GPUs) each rank runs one whole micro-batch and nothing is split.
- Inside a group each micro-batch is cut into W/g contiguous shares whose sizes differ by at most one row, and a
  share's mean loss is weighted by its fraction of the micro-batch's loss units. Shares need not be equal: W need
  not divide batch_size, nor the dataset.
- A rank whose share is empty (more ranks in a group than rows) runs the micro-batch's first row with weight 0,
  so it still joins the collectives and adds nothing.

Gradients are averaged over ranks (DDP's convention), so every weight carries a factor W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..data.sft import IGNORE_INDEX


@dataclass(frozen=True)
class Piece:
    """Share `part` of `parts` of micro-batch `micro` (0 .. grad_accum - 1) of a step."""

    micro: int
    part: int
    parts: int


def step_plan(rank: int, world: int, grad_accum: int) -> list[Piece]:
    """The pieces rank `rank` runs in every step, in order; the list has the same length on every rank."""
    groups = math.gcd(grad_accum, world)
    ranks_per_group, per_group = world // groups, grad_accum // groups
    group, part = divmod(rank, ranks_per_group)
    return [Piece(group * per_group + k, part, ranks_per_group) for k in range(per_group)]


def share(rows: list[int], piece: Piece, world: int, units: Callable[[int], int]) -> tuple[list[int], float]:
    """(the rows of `rows` this piece runs, the weight of their mean loss); `units(row)` counts a row's loss units."""
    if piece.parts == 1:
        return rows, float(world)
    lo, hi = piece.part * len(rows) // piece.parts, (piece.part + 1) * len(rows) // piece.parts
    if lo == hi:
        return rows[:1], 0.0
    counts = [units(i) for i in rows]
    return rows[lo:hi], world * sum(counts[lo:hi]) / max(sum(counts), 1)


def loss_units(example: dict, family: str) -> int:
    """How many terms an example adds to its batch's mean loss: its label tokens after the causal shift (SFT), else 1.

    transformers' causal-LM loss predicts token t+1 from position t, so label 0 never counts.
    """
    if family != "sft":
        return 1
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)
