"""`Splits`: what every task family hands the trainer, plus the seeded dev carve-out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import GpartError


@dataclass
class Splits:
    """Train / dev / eval datasets of one task, ready for a DataLoader with `collate`.

    Each item is a dict (input_ids/labels/... or pixel_values/labels); `collate` batches them into tensors.
    `eval` is the reported split (validation for GLUE), `dev` the one checkpoints are chosen on.
    """

    train: object
    dev: Optional[object]
    eval: Optional[object]
    collate: Callable[[list[dict]], dict]
    labels: Optional[list[str]] = None   # class names; None for regression and SFT
    num_labels: Optional[int] = None
    train_collate: Optional[Callable[[list[dict]], dict]] = None  # training batches only (SFT packing); default collate


def carve_dev(dataset, fraction: float, seed: int, count: int | None = None):
    """Split a `datasets.Dataset` into (train, dev) with a seeded shuffle; dev is None if fraction is 0."""
    n_dev = count if count is not None else int(round(len(dataset) * fraction))
    if n_dev <= 0:
        return dataset, None
    if n_dev >= len(dataset):
        raise GpartError(f"the dev split would take all {len(dataset)} training rows; lower data.dev_fraction "
                         f"or data.dev_samples")
    parts = dataset.train_test_split(test_size=n_dev, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
