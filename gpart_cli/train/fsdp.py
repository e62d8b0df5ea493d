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
- Placement (torch's FSDP2 pattern of meta init, `to_empty`, then a rank-0 broadcast): rank 0 loads the checkpoint
  on the CPU; the other ranks build the same model with every parameter on the meta device (no memory) and take
  from rank 0 what a config alone does not say (`match_rank0`). Each rank checks that the others would shard the
  same units (one collective per unit: a difference would hang NCCL), shards its model, the meta ranks allocate
  only their shards (`to_empty`), and rank 0 broadcasts the weights one tensor at a time; each rank keeps its
  slice (`set_model_state_dict(broadcast_from_rank0=True)`). Per GPU: the shards, plus one whole tensor in flight;
  in host memory: one copy of the model on rank 0's node. (Loading on the CPU on every rank and sharding would
  hold a copy per rank: 8 x 140 GB of host memory for a 70B model in bf16.)
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..core.layer import is_quantized
from ..errors import GpartError
from ..recipe.methods import FSDP_METHODS  # methods whose trainable tensors stay replicated (see methods.Method.fsdp)
from ..versions import release

# fully_shard became public in torch 2.6 and took ignored_params (θ and the heads stay whole) in 2.7.
FSDP_TORCH = "2.7"


def check_torch(version: str | None = None) -> None:
    """Refuse `train.distributed: fsdp` on a torch without what `shard` calls, naming the version and the fix."""
    version = version or torch.__version__
    if release(version) < release(FSDP_TORCH):
        raise GpartError(f"train.distributed: fsdp needs torch>={FSDP_TORCH} (fully_shard with ignored_params); "
                         f"torch {version} is installed. Upgrade it (pip install -U 'torch>={FSDP_TORCH}') or use "
                         f"train.distributed: ddp")


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


def shard(model: nn.Module, device: torch.device, method: str = "gpart", weights: dict | None = None) -> nn.Module:
    """Shard `model` in place over the default process group and return it (it is also the module to call).

    `model` may sit on the CPU: each unit is moved to `device` as it is sharded, so no rank ever holds the
    whole model on its GPU. With `weights` (rank 0: its model's full state dict, taken before sharding; other ranks:
    {}), the ranks other than 0 pass a model whose parameters are on the meta device, and every rank ends with
    rank 0's weights in its shards (see the module docstring).
    """
    from torch.distributed.fsdp import fully_shard

    check_torch()
    units = blocks(model)
    _check(model, method, units)
    keep = replicated(model)
    with torch.no_grad():
        for p in keep:  # FSDP moves what it shards; quantized weights were placed on the GPU at load
            if p.is_meta:  # a skeleton's head or LoRA factor: storage here, the same Parameter (the optimizer's)
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device=device), p.requires_grad))
            elif p.device != device:
                p.data = p.data.to(device)
    units = [unit for unit in [*units, *_embeddings(model)] if any(p not in keep for p in unit.parameters())]
    _check_same_plan(model, units, keep)
    for unit in units:
        fully_shard(unit, ignored_params=keep)
    # The root reshards after its forward too (it holds only norms and the like): otherwise a no-grad forward
    # (an evaluation) leaves it gathered until something reshards it, and a `state_dict()` that rank 0 alone
    # calls while saving (PEFT does) would put the ranks out of step at the next forward.
    fully_shard(model, ignored_params=keep, reshard_after_forward=True)
    if weights is not None:
        _materialise(model, device)
        _load_from_rank0(model, weights)
    return model


def match_rank0(model: nn.Module) -> None:
    """Give every rank's model rank 0's parameter dtypes and non-persistent buffers (every rank calls it, before the
    method is applied).

    A skeleton is built from the config alone. With dtype `auto` and a config that records no dtype it would come out
    fp32 where rank 0's `from_pretrained` takes the weights' dtype, and buffers computed at init follow the dtype a
    model was built in. Non-persistent buffers (rotary frequencies) are in no state dict, so the broadcast of the
    weights does not carry them: rank 0's are sent here.
    """
    import torch.distributed as dist
    from safetensors.torch import load, save

    from .distributed import from_rank0

    if not dist.is_initialized():
        return

    def read() -> dict[str, bytes]:
        dtypes = {name: str(p.dtype).removeprefix("torch.") for name, p in model.named_parameters()}
        return {"dtypes": json.dumps(dtypes).encode(), "buffers": save(non_persistent_buffers(model))}

    files = from_rank0(read, "its model's dtypes and buffers")
    if dist.get_rank() == 0:
        return
    dtypes = json.loads(files["dtypes"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in dtypes and p.is_meta:
                p.data = p.data.to(getattr(torch, dtypes[name]))
    ours = dict(model.named_buffers())
    for name, value in load(files["buffers"]).items():
        if name in ours:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, value.to(ours[name].device), persistent=False)


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers no state dict holds (computed at init), by name: contiguous CPU copies."""
    saved = set(model.state_dict())
    return {name: b.detach().cpu().contiguous().clone() for name, b in model.named_buffers() if name not in saved}


def plan(model: nn.Module, units: list[nn.Module], keep: set[nn.Parameter]) -> list[str]:
    """What sharding will do, one line per FSDP unit (the root last) and one for the replicated tensors: every
    parameter by name, shape and dtype. Every rank must have the same lines: each unit is one collective."""
    names = {id(m): name for name, m in model.named_modules()}
    full = {p: name for name, p in model.named_parameters()}
    owned: set[nn.Parameter] = set()
    lines = []
    for unit in [*units, model]:
        mine = [(full[p], p) for p in unit.parameters() if p not in keep and p not in owned]
        owned.update(p for _, p in mine)
        lines.append(f"unit {names[id(unit)] or '(root)'}: " + _params_line(mine))
    lines.append("replicated: " + _params_line([(n, p) for n, p in model.named_parameters() if p in keep]))
    return lines


def _params_line(params: list[tuple[str, nn.Parameter]]) -> str:
    return ", ".join(f"{n} {list(p.shape)} {str(p.dtype).removeprefix('torch.')}" for n, p in params) or "-"


def _check_same_plan(model: nn.Module, units: list[nn.Module], keep: set[nn.Parameter]) -> None:
    """Raise on every rank, instead of hanging in a collective, when the ranks would shard different units."""
    import torch.distributed as dist

    from .distributed import all_ranks, from_rank0

    mine = plan(model, units, keep)
    rank0 = json.loads(from_rank0(lambda: {"plan": json.dumps(mine).encode()}, "its FSDP plan")["plan"])
    differ = [r for r, same in enumerate(all_ranks(mine == rank0)) if not same]
    if not differ:
        return
    rank = dist.get_rank()
    detail = _first_difference(rank0, mine, rank) if rank in differ else "see the message of those ranks"
    raise GpartError(f"train.distributed: fsdp: ranks {differ} would shard the model differently from rank 0 "
                     f"({detail}). Every rank must build the same model: give every node the same model files and the "
                     f"same torch and transformers versions, or use train.distributed: ddp")


def _first_difference(rank0: list[str], mine: list[str], rank: int) -> str:
    i = next((i for i, (a, b) in enumerate(zip(rank0, mine)) if a != b), min(len(rank0), len(mine)))
    theirs, ours = (lines[i] if i < len(lines) else "nothing" for lines in (rank0, mine))
    return f"rank 0 has {theirs!r}, rank {rank} has {ours!r}"


def _materialise(model: nn.Module, device: torch.device) -> None:
    """Give the meta parameters (this rank's shards, meta replicated ones) uninitialised storage on `device`.

    `to_empty` renews every tensor, so the real ones (buffers such as rotary frequencies, which no checkpoint
    holds, and θ) are kept aside and put back.
    """
    if not any(p.is_meta for p in model.parameters()):
        return  # rank 0: its model is real
    real = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
            if not t.is_meta}
    model.to_empty(device=device)
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for name, value in real.items():
            tensors[name].copy_(value)


def _load_from_rank0(model: nn.Module, weights: dict) -> None:
    """Every rank's shards (and replicated tensors) from rank 0's full state dict, one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
