"""The reference path's two per-weight ops as torch ops: the W_eff build (a gather plus W0) and the grouped sum.

`groups` runs them where the compiled CPU loops do not apply, and `cpu_native` checks its loops against them
bit for bit. Both import them from here, so the kernels never import back into `groups`.
"""

from __future__ import annotations

from typing import Optional

import torch

# The chain rule of θ's scaling (`GPartState.scaled_theta`), applied to ∂L/∂θ_scaled: (the dropout factor 1/(1-p),
# or None) and then the per-group scale 1/sqrt(n_j) (ones for the non-isometric ablation), a float32 [d] tensor.
Scaling = Optional[tuple[Optional[float], torch.Tensor]]


def scale_grad(grad: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    """∂L/∂θ from ∂L/∂θ_scaled, in place: × factor, then × scale, as autograd would through `scaled_theta`. The
    compiled grouped sum fuses the same two fp32 multiplications, in this order, so both give the same bits."""
    if scaling is not None:
        factor, scale = scaling
        if factor is not None:
            grad.mul_(factor)
        grad.mul_(scale)
    return grad


def torch_build(w0: torch.Tensor | None, table: torch.Tensor, ids: torch.Tensor, drop: torch.Tensor | None
                ) -> torch.Tensor:
    delta = _gather(table, ids)  # one W-sized buffer, reused below
    if drop is not None:
        delta.masked_fill_(drop, 0.0)
    return delta if w0 is None else delta.add_(w0 if w0.dtype == torch.float32 else w0.float())


def _gather(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids], 1-D. On the CPU as four (or two) rows of one `torch.gather`, which torch splits over its
    threads, where `index_select` on a 1-D table is serial: about 1.3x faster on the cold data of a training
    step. A copy, so the rows change no bits."""
    rows = 4 if ids.numel() % 4 == 0 else 2 if ids.numel() % 2 == 0 else 1
    if table.device.type != "cpu" or rows == 1:
        return table.index_select(0, ids.int())  # uint16 ids widened; int32 ones pass as they are
    return torch.gather(table.expand(rows, table.numel()), 1, ids.long().view(rows, -1)).view(-1)


def torch_grouped_add(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, drop: torch.Tensor | None = None
                      ) -> None:
    """The grouped sum with torch ops, added into `rows` (`values` is overwritten where dropped).

    On the CPU `rows` has two rows: the two halves of the weights are added into them by one scatter_add_, which
    torch runs on two threads (the 1-D reductions are serial) in index order within each row: about 1.5x faster
    on the cold data it meets in a training step. Always two halves, whatever the thread count, so the bits do not
    depend on it (an odd count goes into the first row alone). Elsewhere one row, by index_add_, which torch's
    deterministic mode makes deterministic on CUDA.
    """
    if drop is not None:
        values.masked_fill_(drop, 0.0)  # adding +0.0 changes no row: rows start at +0.0 and never hold -0.0
    if values.device.type != "cpu":
        rows[0].index_add_(0, ids, values)
    elif values.numel() % 2:
        rows[0].scatter_add_(0, ids.long(), values)
    else:
        rows.scatter_add_(1, ids.long().view(2, -1), values.view(2, -1))
