"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for adapter training: the frozen base sharded, θ replicated.

- Units: every block of the model's outermost repeated-layer list (`model.layers`, `encoder.layer`, `h`), the
  input and output embeddings when they are separate tensors (each holds ~1B parameters at 70B), and the root
  for the rest (final norm, pooler). Between its forward and backward a block holds only its shard.
- θ and every other trainable tensor (a task head, LoRA factors) are `ignored_params`: whole tensors on every
  rank, their gradients averaged by `distributed.average_gradients` once per step, as DDP would. They are KB to
  MB, so sharding them would save nothing and would make checkpoints and the `.gpart` file need a gather; kept
  whole, they are written by rank 0 exactly as in a single process.
- bitsandbytes 4/8-bit weights are ignored too (replicated): their quantization state lives beside the tensor
  and would not survive FSDP's conversion to DTensor shards.
- Inside a block's forward, and in its backward after FSDP's pre-backward all-gather, each base weight is the
  whole unsharded tensor: the GPart Function receives W0 of the layer's full shape and adds ΔW gathered from the
  layer's own global index range. Outside, weights are DTensor shards that no GPart code reads.
- An unmerged GPart layer builds W_eff for each call and keeps no copy of it after (in eval as in training), so
  nothing unsharded outlives its block's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GpartError
from ..layer import is_quantized
from ..methods import FSDP_METHODS  # methods whose trainable tensors stay replicated (see methods.Method.fsdp)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of the outermost `nn.ModuleList`s of same-type, parameter-holding modules."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1 and any(True for _ in m.parameters())]
    outer = [m for name, m in lists if not any(name.startswith(other + ".") for other, _ in lists if other)]
    return [block for m in outer for block in m]


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """Input and output embeddings as their own units, unless tied (one tensor must live in one unit)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inp = get_in() if get_in else None
    out = get_out() if get_out else None
    if inp is None or out is None:
        return [m for m in (inp, out) if m is not None]
    if getattr(inp, "weight", None) is getattr(out, "weight", None):
        return []
    return [inp, out]


def replicated(model: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP leaves whole: the trainable ones and bitsandbytes-quantized weights."""
    keep = {p for p in model.parameters() if p.requires_grad}
    for module in model.modules():
        if is_quantized(module):
            keep.update(module.parameters())
    return keep


def _check(model: nn.Module, method: str, units: list[nn.Module]) -> None:
    if method not in FSDP_METHODS:
        raise GpartError(f"train.distributed: fsdp does not support method {method!r}: it trains or saves every "
                         f"weight, and gpart's FSDP shards only the frozen base. Use train.distributed: ddp, or "
                         f"one of {', '.join(FSDP_METHODS)}")
    if not units:
        raise GpartError(f"train.distributed: fsdp found no transformer blocks in {type(model).__name__} (an "
                         f"nn.ModuleList of layers); use train.distributed: ddp")


def shard(model: nn.Module, device: torch.device, method: str = "gpart") -> nn.Module:
    """Shard `model` in place over the default process group and return it (it is also the module to call).

    `model` may sit on the CPU: each unit is moved to `device` as it is sharded, so no rank ever holds the
    whole model on its GPU.
    """
    from torch.distributed.fsdp import fully_shard

    units = blocks(model)
    _check(model, method, units)
    keep = replicated(model)
    with torch.no_grad():
        for p in keep:  # FSDP moves what it shards; quantized weights were placed on the GPU at load
            if p.device != device:
                p.data = p.data.to(device)
    for unit in [*units, *_embeddings(model)]:
        if any(p not in keep for p in unit.parameters()):
            fully_shard(unit, ignored_params=keep)
    # The root reshards after its forward too (it holds only norms and the like): otherwise a no-grad forward
    # (an evaluation) leaves it gathered until something reshards it, and a `state_dict()` that rank 0 alone
    # calls while saving (PEFT does) would put the ranks out of step at the next forward.
    fully_shard(model, ignored_params=keep, reshard_after_forward=True)
    return model
