"""Putting GPart into a model (docs/design.md §1, §8): find the targets, fix the module spec, wrap, merge.

The module spec is the ordered list of adapted modules (name, weight shape, has-bias) in
`model.named_modules()` order; it fixes each weight's global index, so it is part of the adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager

import torch
from torch import nn

from .. import rng
from ..errors import GpartError
from ..kernels.delta_ops import LayerGroups
from ..kernels.dispatch import ComputeLog, read_switches
from ..kernels.modes import Switches
from ..kernels.theta_grad import GradSink, ThetaSCache, scale_theta
from ..partition import FEISTEL, Partition
from ..partition.feistel import check_d
from ..partition.spec import PartitionSpec
from .config import GPartConfig
from .layer import GPartLinear, check_supported
from .quantized import is_quantized, keep_autograd_layout, weight_shape

STATE_NAME = "gpart_state"
MERGED = "gpart_merged"  # plain attribute of a merged model: the adapter folded in (`gpart.swap` takes it out)


def initial_theta(config: GPartConfig) -> torch.Tensor:
    """theta at the start: exactly 0, or uniform in [-init_bound, init_bound] from the counter hash of init_seed."""
    if config.init_bound == 0:
        return torch.zeros(config.d, dtype=torch.float32)
    u = rng.uniform(config.d, rng.init_key(config.init_seed))
    return ((2.0 * u - 1.0) * config.init_bound).float()


class GPartState(nn.Module):
    """The one trainable vector theta (fp32, [d]) and the partition's bookkeeping.

    `dropout_key` is the key of the current micro-batch's ΔW dropout mask (the trainer sets it); `compute`
    records which path (Triton kernels or reference) each op ran on; `switches` are the compute-path switches of
    the model forward under way (None outside one: a layer called on its own reads them itself).
    """

    def __init__(self, config: GPartConfig, targets: list[dict], n_params: int,
                 partition: Partition | None = None) -> None:
        super().__init__()
        self.config = config
        self.targets = targets  # module spec: [{"name", "shape", "bias"}] in canonical order
        self.n_params = n_params
        self.partition = partition or Partition(config.partition, n_params, config.d, config.seed)
        self.theta = nn.Parameter(initial_theta(config))
        self.register_buffer("inv_sqrt_sizes", self.partition.scales(config.isometric), persistent=False)
        self.head_names: list[str] = []
        self.dropout_key: int | None = None
        self.compute = ComputeLog()
        self.switches: Switches | None = None
        self._theta_s = ThetaSCache()  # one θ_s per θ value, device and mode (kernels/theta_grad.py)

    @property
    def spec(self) -> PartitionSpec:
        """This adapter's partition identity (what fixes P)."""
        c = self.config
        return PartitionSpec.from_record({"partition": c.partition, "n_params": self.n_params, "d": c.d,
                                          "seed": c.seed, "isometric": c.isometric, "targets": self.targets})

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move theta but not round it: theta stays fp32 (docs/design.md §1).
        theta, scale = self.theta.data, self.inv_sqrt_sizes  # fn builds new tensors; these keep fp32 values
        super()._apply(fn, recurse)
        if self.theta.dtype != torch.float32:
            self.theta.data = theta.to(self.theta.device)
        if self.inv_sqrt_sizes.dtype != torch.float32:
            self.inv_sqrt_sizes = scale.to(self.inv_sqrt_sizes.device)
        return self

    def scaled_theta(self, device: torch.device | None = None, dropout: bool = False) -> torch.Tensor:
        """theta_j / sqrt(n_j) (theta itself when not isometric): what each weight of group j gets, on `device`.

        With `dropout` (a layer in training mode) and method dropout p > 0 it is also scaled by 1/(1-p), as
        `nn.Dropout` scales the values it keeps. The move to `device` is differentiable.
        """
        return scale_theta(self.theta, self.inv_sqrt_sizes, self._dropout_factor(dropout), device)

    def _dropout_factor(self, training: bool) -> float | None:
        return 1.0 / (1.0 - self.config.dropout) if self._dropout_scales(training) else None

    def _dropout_scales(self, training: bool) -> bool:
        """Whether ΔW dropout is active, so that theta_s carries its 1/(1-p) factor: a training call and p > 0."""
        return training and self.config.dropout > 0

    def shared_scaled_theta(self, device: torch.device, dropout: bool = False) -> torch.Tensor:
        """`scaled_theta` without a graph, computed once per θ value and device and shared by every layer."""
        return self._theta_s.shared(self.theta, self.inv_sqrt_sizes, self._dropout_factor(dropout), device)

    def layer_theta(self, device: torch.device, training: bool) -> tuple[torch.Tensor, GradSink | None]:
        """θ_s for the layers' Functions on `device`, and the sink their backward adds ∂L/∂W into (none without
        autograd); one per step, device and mode (docs/design.md §3.1)."""
        return self._theta_s.for_layers(self.theta, self.inv_sqrt_sizes, self._dropout_factor(training), device)

    def forget_shared(self) -> None:
        self._theta_s.clear()

    def dropout(self, training: bool) -> tuple[int, int] | None:
        """(threshold, key) of ΔW dropout for a layer in this mode, or None (eval mode, or p = 0)."""
        if not training or self.config.dropout == 0:
            return None
        key = self.dropout_key
        if key is None:
            # No trainer set a key: draw one from torch's CPU RNG, so torch.manual_seed reproduces the masks and
            # torch.utils.checkpoint (which restores the RNG state) recomputes the same ones.
            key = int(torch.randint(0, 2**62, (1,)))
        return rng.drop_threshold(self.config.dropout), key


def matches_target(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _inside(name: str, head_modules) -> bool:
    """Whether module `name` is one of `head_modules` or nested inside one."""
    parts = name.split(".")
    return bool(head_modules) and any(matches_target(".".join(parts[:k]), tuple(head_modules))
                                      for k in range(1, len(parts) + 1))


def find_targets(model: nn.Module, config: GPartConfig) -> list[tuple[str, nn.Module]]:
    """The modules to adapt, in canonical order; raises `GpartError` if none match."""
    found = [(name, m) for name, m in model.named_modules()
             if name and matches_target(name, config.target_modules) and not _inside(name, config.head_modules)
             and not isinstance(m, GPartLinear) and not name.endswith(".base_layer")]
    if not found:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if name and isinstance(getattr(m, "weight", None), torch.Tensor)})
        raise GpartError(f"no module matches target_modules={list(config.target_modules)!r}. Modules with "
                         f"weights in this model: {', '.join(leaves)}. Set target_modules to some of these")
    for name, module in found:
        check_supported(name, module)
    return found


def module_spec(found: list[tuple[str, nn.Module]], adapt_bias: bool) -> list[dict]:
    """Ordered [{name, shape, bias}] describing the adapted parameters."""
    return [{"name": name, "shape": list(weight_shape(m)), "bias": bool(adapt_bias and m.bias is not None)}
            for name, m in found]


def adapted_numel(module: nn.Module, adapt_bias: bool) -> int:
    """How many adapted parameters a target module contributes (weight, then bias)."""
    n = 1
    for size in weight_shape(module):
        n *= size
    return n + (module.bias.numel() if adapt_bias else 0)


def fingerprint(spec: list[dict]) -> str:
    """sha256 of the ordered target names and shapes: identifies the architecture an adapter fits.

    Dtypes are left out on purpose: an adapter trained on an fp32 base must load into a bf16 copy.
    """
    payload = json.dumps([[t["name"], list(t["shape"]), bool(t["bias"])] for t in spec], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply(model: nn.Module, config: GPartConfig) -> nn.Module:
    """Wrap every target module of `model` in place and return it (docs/design.md §8).

    Base weights are frozen; the only new trainable parameter is theta (plus the head modules, when the
    config names them).

    Raises:
        GpartError: no module matches, a target is not a linear layer, or d is out of range.
    """
    if hasattr(model, STATE_NAME):
        raise GpartError("this model already has GPart applied; call gpart.merge(model) or start from the base")
    found = find_targets(model, config)
    if config.bias and any(is_quantized(m) and m.bias is not None for _, m in found):
        raise GpartError("bias: true is not supported on a quantized base; set method.bias: false")
    spec = module_spec(found, config.bias)
    sizes = [adapted_numel(m, entry["bias"]) for entry, (_, m) in zip(spec, found)]
    n_params = sum(sizes)
    # The authors' partitions assign weights independently and accept d > N (some groups stay empty); feistel-v1
    # cuts a permutation into d non-empty groups, so only it bounds d by N.
    check_d(config.d, n_params if config.partition == FEISTEL else None, len(spec))
    for p in model.parameters():
        p.requires_grad_(False)
    if any(is_quantized(m) for _, m in found):
        keep_autograd_layout(model)
    device = next((m.weight.device for _, m in found), torch.device("cpu"))
    if device.type == "meta":  # a skeleton (FSDP ranks but 0): θ and the group scales stay real (d values)
        device = torch.device("cpu")
    partition = Partition(config.partition, n_params, config.d, config.seed, sizes)
    partition.counts(device if device.type == "cuda" else None)  # counted on the GPU where it is not closed-form
    state = GPartState(config, spec, n_params, partition).to(device)
    model.add_module(STATE_NAME, state)
    model.register_forward_pre_hook(_before_forward)
    model.register_forward_hook(_after_forward, always_call=True)
    offset = 0
    for entry, count, (name, module) in zip(spec, sizes, found):
        n_bias = module.bias.numel() if entry["bias"] else 0
        groups = LayerGroups(partition, offset, count - n_bias, n_bias, state.compute)
        _set_module(model, name, GPartLinear(module, state, groups, entry["bias"]))
        offset += count
    state.head_names = _unfreeze_heads(model, config.head_modules)
    return model


def _before_forward(model: nn.Module, args) -> None:
    """Before each forward of the model: recompute the shared scaled theta (see GPartState.shared_scaled_theta) and
    read the compute-path switches once for the whole forward. A module-level function that finds the state through
    the model, so a deep copy of the model clears its own."""
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, GPartState):
        state.forget_shared()
        state.switches = read_switches()


def _after_forward(model: nn.Module, args, output) -> None:
    """After each forward of the model, raised or not: layers called on their own read the switches again."""
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, GPartState):
        state.switches = None


def _unfreeze_heads(model: nn.Module, head_modules) -> list[str]:
    names = []
    for name, p in model.named_parameters():
        if _inside(name.rsplit(".", 1)[0], head_modules):
            p.requires_grad_(True)
            names.append(name)
    if head_modules and not names:
        raise GpartError(f"no parameter lies under head_modules={list(head_modules)!r}; name the task head "
                         f"module (e.g. classifier, score) or leave head_modules empty")
    return names


def state_of(model: nn.Module) -> GPartState:
    """The model's `GPartState`; raises `GpartError` if GPart was not applied."""
    state = getattr(model, STATE_NAME, None)
    if not isinstance(state, GPartState):
        raise GpartError("this model has no GPart adapter: call gpart.apply(model, config) or gpart.load first")
    return state


def theta(model: nn.Module) -> nn.Parameter:
    """The one trainable GPart parameter of `model`: shape [d], fp32."""
    return state_of(model).theta


def gpart_layers(model: nn.Module) -> list[tuple[str, GPartLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GPartLinear)]


def compute_path(model: nn.Module) -> str | None:
    """Which path (Triton kernels or reference) the model's GPart layers ran on, or None without GPart."""
    state = getattr(model, STATE_NAME, None)
    return state.compute.describe() if isinstance(state, GPartState) else None


def set_dropout_key(model: nn.Module, seed: int, micro_batch: int) -> None:
    """Key ΔW dropout to (train seed, micro-batch index): the same masks on resume and on recompute.

    A no-op for models without GPart (the trainer calls it for every method).
    """
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, GPartState):
        state.dropout_key = rng.micro_batch_key(seed, micro_batch)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold ΔW into the base weights (fp32 sum, one rounding) and remove every GPart module.

    Layer by layer: one W_eff and one layer's group-id cache alive at a time. Returns the same model object,
    now a plain transformers/torch model. Head modules stay trained.
    """
    state_of(model)
    layers = gpart_layers(model)
    quantized = next((layer for _, layer in layers if layer.quantized), None)
    if quantized is not None:
        quantized.merged_weights()  # raises the GpartError that explains how to merge instead
    for name, layer in layers:
        w, b = layer.merged_weights()
        base = layer.base_layer
        base.weight.data.copy_(w)
        if layer.adapt_bias:
            base.bias.data.copy_(b)
        del w, b
        layer.groups.release()
        _set_module(model, name, base)
    _remember_merge(model, state_of(model))
    delattr(model, STATE_NAME)
    for hooks, ours in ((model._forward_pre_hooks, _before_forward), (model._forward_hooks, _after_forward)):
        for key, hook in list(hooks.items()):  # a plain model again: no GPart hook left behind
            if hook is ours:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
    return model


@contextmanager
def merged_for_decoding(model: nn.Module, keep_ids: bool = False):
    """Inside: each GPart layer's W_eff folded into its base layer, as `merge` does; after: the model as it was.

    An unmerged layer builds W_eff on every call, so decoding would rebuild every adapted weight for every token.
    The merged weights are the bits the unmerged forward builds (W0 + ΔW summed in fp32, rounded once to the base
    dtype), so outputs are the same. W0 is kept on the CPU meanwhile (no extra GPU memory) and put back exactly:
    W_eff - ΔW would not round back to it. Quantized layers stay unmerged (see `merge`); a model without GPart
    passes through. Each layer's cached group ids are freed meanwhile, unless `keep_ids` (a training loop that decodes
    every step, as GRPO's rollouts do, would otherwise rebuild them every step: seconds for a 135M model on a CPU).
    """
    layers = [(name, layer) for name, layer in gpart_layers(model) if not layer.quantized] \
        if isinstance(getattr(model, STATE_NAME, None), GPartState) else []
    kept = []
    try:
        for name, layer in layers:
            w, b = layer.merged_weights()  # detached: no graph
            base = layer.base_layer
            originals = (base.weight.data, base.bias.data if layer.adapt_bias else None)
            kept.append((name, layer, tuple(None if t is None else t.to("cpu") for t in originals)))
            base.weight.data = w
            if layer.adapt_bias:
                base.bias.data = b
            if not keep_ids:
                layer.groups.release()
            _set_module(model, name, base)
        yield model
    finally:
        for name, layer, (weight, bias) in kept:
            base = layer.base_layer
            base.weight.data = weight.to(base.weight.device)
            if bias is not None:
                base.bias.data = bias.to(base.bias.device)
            _set_module(model, name, layer)


def merge_record(spec: PartitionSpec, theta: torch.Tensor) -> dict:
    """What a merged model remembers of the adapter folded into it: its partition and θ (fp32, on the CPU)."""
    return {"spec": spec, "theta": theta.detach().float().cpu().clone()}


def _remember_merge(model: nn.Module, state: GPartState) -> None:
    """Record the merged θ on the model for `gpart.swap`; a second merge of the same partition adds up, one of
    another partition leaves a record that swap refuses (no single θ describes the weights then)."""
    record = merge_record(state.spec, state.theta)
    previous = getattr(model, MERGED, None)
    if previous is not None:
        same = previous.get("spec") == record["spec"]
        record = {**record, "theta": previous["theta"] + record["theta"]} if same else {"stacked": True}
    setattr(model, MERGED, record)
