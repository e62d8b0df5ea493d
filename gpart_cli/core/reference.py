"""GPart on one screen (docs/design.md §1.2): the method as written, and the oracle the tests hold the
fast path to (`core/layer.py` with `kernels/`: cached ids, compiled loops, Triton, one ∂L/∂θ buffer per step).

The N adapted parameters (each target's weight, then its bias, in module-spec order) are split by a seeded
partition g into d groups (`gpart_cli.partition`, any algorithm); group j holds n_j of them. One trainable θ ∈ R^d:

    ΔW    = (θ · scale)[g], reshaped to each weight     scale_j = 1/√n_j  (1 for the non-isometric ablation)
    w     = w0 + ΔW = w0 + Pθ                           P_ij = scale_j iff g(i) = j, so PᵀP = I when isometric
    ∂L/∂θ = Pᵀ ∂L/∂w                                    here by autograd through the gather: no custom backward

Plain and slow on purpose: every id is materialised (int64), and `dense_p` builds P itself (tiny N only).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..partition import Partition


def group_of(partition: Partition) -> torch.Tensor:
    """g(i) for every adapted parameter i in [0, N), module by module: int64 [N] on the CPU."""
    starts = itertools.accumulate(partition.layer_sizes, initial=0)
    return torch.cat([partition.ids(start, size).long() for start, size in zip(starts, partition.layer_sizes)])


def scale(partition: Partition, isometric: bool = True) -> torch.Tensor:
    """scale_j = 1/√n_j, n_j counted from g (fp64 [d]; an empty group, possible in the authors' partitions, gets 1);
    ones when not isometric."""
    if not isometric:
        return torch.ones(partition.d, dtype=torch.float64)
    return torch.bincount(group_of(partition), minlength=partition.d).clamp(min=1).double().rsqrt()


def delta(theta: torch.Tensor, partition: Partition, isometric: bool = True) -> torch.Tensor:
    """ΔW of all N adapted parameters, flat in global order: (θ · scale)[g], in θ's dtype, differentiable in θ."""
    return (theta * scale(partition, isometric).to(theta))[group_of(partition).to(theta.device)]


def adapted(theta: torch.Tensor, partition: Partition, w0: list[torch.Tensor], isometric: bool = True
            ) -> list[torch.Tensor]:
    """w = w0 + ΔW for each adapted tensor in global order (per target: weight, then bias, as stored), summed in
    the wider of the two dtypes and rounded once to w0's."""
    flat, start, out = delta(theta, partition, isometric), 0, []
    for w in w0:
        out.append((w + flat[start:start + w.numel()].view_as(w)).to(w.dtype))
        start += w.numel()
    return out


def forward(model: nn.Module, theta: torch.Tensor, partition: Partition, targets: list[str], bias: bool,
            isometric: bool = True, **inputs):
    """`model(**inputs)` with every target's weight (and bias, with `bias`) replaced by w0 + ΔW; the model itself is
    left as it is. Backward from its output gives ∂L/∂θ (and ∂L/∂w0 where w0 requires it) by plain autograd."""
    params, names = dict(model.named_parameters()), []
    for t in targets:
        names += [f"{t}.weight"] + ([f"{t}.bias"] if bias and f"{t}.bias" in params else [])
    new = adapted(theta, partition, [params[name] for name in names], isometric)
    return torch.func.functional_call(model, dict(zip(names, new)), (), inputs)


def dense_p(partition: Partition, isometric: bool = True) -> torch.Tensor:
    """P as a dense fp64 [N, d] matrix (tiny N only): ΔW = Pθ, and PᵀP = I when isometric (no empty group)."""
    ids = group_of(partition)
    p = torch.zeros(partition.n, partition.d, dtype=torch.float64)
    p[torch.arange(partition.n), ids] = scale(partition, isometric)[ids]
    return p
