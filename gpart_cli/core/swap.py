"""Many adapters on one base (docs/design.md §8): `swap` one GPart adapter for another without loading the base again.

- A model with GPart applied (`gpart.apply` / `gpart.load`): the swap replaces θ and the head. Exact: the forward
  builds W0 + Pθ from the untouched base weights, as a fresh load would.
- A merged model (`gpart.merge`, which records the θ it folded in) or a plain base (θ_old = 0): one pass over the
  target weights, W ← W + P(θ_new − θ_old), summed in fp32 and rounded once into the weight's dtype, then the new
  head. P is linear, so this is the merge of θ_new up to that rounding (fp32 weights: ~1e-7 relative; bf16 weights
  take one bf16 rounding per swap, so swap back to the base or reload when many swaps pile up).

Both adapters must share the partition, i.e. the same targets (names, shapes, bias), N, d, seed and isometric flag:
otherwise P differs and θ_new − θ_old means nothing. A mismatch is refused with what differs.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..errors import GpartError
from ..kernels.delta_ops import LayerGroups
from ..kernels.dispatch import ComputeLog
from ..partition import Partition
from ..partition.spec import PartitionSpec
from .artifact import Artifact, read_artifact, restore_head
from .layer import check_supported
from .model import MERGED, STATE_NAME, GPartState, find_targets, merge_record, module_spec
from .quantized import is_quantized


def _artifact(adapter) -> Artifact:
    return adapter if isinstance(adapter, Artifact) else read_artifact(adapter)


def _check_same_partition(current: PartitionSpec, art: Artifact, what: str) -> None:
    """Refuse an adapter whose partition differs from `current`."""
    differences = current.diff(art.spec, "this model", "the adapter")
    if differences:
        raise GpartError(f"cannot swap {art.path} into {what}: its partition differs "
                         f"({'; '.join(str(d) for d in differences)}). Swapping needs adapters trained with the same "
                         f"method.d, method.seed, target modules and base; load this one into a fresh base instead")


def _plain_base_record(model: nn.Module, art: Artifact) -> dict:
    """A base without an adapter as a merged model with θ = 0, after checking it has the adapter's targets."""
    found = find_targets(model, art.config)
    spec = module_spec(found, any(t["bias"] for t in art.meta["targets"]))
    n_params = sum(math.prod(t["shape"]) + (m.bias.numel() if t["bias"] else 0) for t, (_, m) in zip(spec, found))
    c = art.config
    here = PartitionSpec.from_record({"partition": c.partition, "n_params": n_params, "d": c.d, "seed": c.seed,
                                      "isometric": c.isometric, "targets": spec})
    return merge_record(here, torch.zeros(c.d))


@torch.no_grad()
def _add_delta(model: nn.Module, spec: PartitionSpec, delta_theta: torch.Tensor) -> None:
    """W ← W + P·delta_theta on every target (fp32 sum, one rounding), layer by layer."""
    n, offset = spec.n_params, 0
    modules = [model.get_submodule(t.name) for t in spec.targets]
    layer_sizes = [m.weight.numel() + (m.bias.numel() if t.bias else 0) for t, m in zip(spec.targets, modules)]
    partition = Partition(spec.algorithm, n, spec.d, spec.seed, layer_sizes)  # feistel-v1 or the authors'
    theta_s = delta_theta.float() * partition.scales(spec.isometric)  # as GPartState.scaled_theta
    for entry, module in zip(spec.targets, modules):
        check_supported(entry.name, module)
        if is_quantized(module):
            raise GpartError(f"target {entry.name} is quantized: swapping into a 4/8-bit base would re-quantize the "
                             f"weights; swap into an unquantized copy")
        n_weight = module.weight.numel()
        n_bias = module.bias.numel() if entry.bias else 0
        groups = LayerGroups(partition, offset, n_weight, n_bias, ComputeLog())
        local = theta_s.to(module.weight.device)
        module.weight.data.copy_(groups.build(module.weight.detach(), local))
        if n_bias:
            module.bias.data.copy_(groups.effective_bias(module.bias.detach(), local))
        offset += n_weight + n_bias


def swap(model: nn.Module, adapter: str | os.PathLike | Artifact) -> nn.Module:
    """Replace the GPart adapter in `model` by `adapter` (a .gpart path or a read `Artifact`), in place.

    Args:
        model: a model with GPart applied, a model merged by `gpart.merge`, or the plain base (nothing merged yet).
        adapter: the adapter to switch to; it must share the current adapter's partition.

    Returns:
        The same model object, now computing with `adapter`'s θ and head.

    Raises:
        GpartError: the partitions differ, the head does not fit, or the base is quantized (merged path).
    """
    art = _artifact(adapter)
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, GPartState):
        _check_same_partition(state.spec, art, "this model's adapter")
        with torch.no_grad():
            state.theta.copy_(art.theta.to(state.theta.device))
        restore_head(model, art, "adapters swapped into one base need heads of the same shape")
        return model
    record = getattr(model, MERGED, None) or _plain_base_record(model, art)
    if record.get("stacked"):
        raise GpartError("this model has adapters of different partitions merged into it, so no single θ describes "
                         "what to take out; swap into the base model instead")
    _check_same_partition(record["spec"], art, "this merged model")
    _add_delta(model, record["spec"], art.theta.float() - record["theta"])
    restore_head(model, art, "adapters swapped into one base need heads of the same shape")
    setattr(model, MERGED, merge_record(record["spec"], art.theta))
    return model

