"""The GPart layer (docs/design.md §1, §3): a frozen linear whose weight is W0 + ΔW, ΔW gathered from theta.

ΔW_i = theta_g(i) / sqrt(n_g(i)). The 1/sqrt(n_j) factor depends only on the group, so the layer
scales theta once (d values) and gathers: ΔW = theta_scaled[g]. In backward the grouped reduction runs on
the unscaled sum and the Function applies the scale to d values (`GPartState.theta_grad`), never to N.
`LayerGroups` decides how g is found: on-the-fly Triton kernels on CUDA, cached ids (uint16 or int32) on the
reference path.

A custom autograd Function saves x and the (tiny) scaled theta and keeps nothing of the size of W between
forward and backward: backward rebuilds W_eff for ∂L/∂x, one layer at a time (docs/design.md §3.1). On the CPU that
second gather costs about 1% of a step and keeps GPart's peak memory below LoRA's (benchmarks/step_time.py).

Dropout on ΔW (method.dropout, as the authors apply `nn.Dropout` to ΔW) scales theta by 1/(1-p) and zeroes
the dropped weights of ΔW with a mask recomputed from a key (see `gpart_cli.rng`); it is off in eval mode.
Outside training no layer caches anything: each call builds its W_eff and drops it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GpartError
from .groups import LayerGroups
from .quantized import is_quantized, weight_shape


def _autocast_device(x: torch.Tensor) -> bool:
    """Whether autocast exists for x's device type: every real one, not `meta` (shape-only tensors)."""
    return x.device.type != "meta"


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on, else the weight's."""
    if _autocast_device(x) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _no_autocast(x: torch.Tensor):
    if _autocast_device(x) and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    # Conv1D (GPT-2 style) stores W as (in, out); nn.Linear as (out, in).
    return F.linear(x, w.t() if transposed else w, b)


class GPartLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b_eff, with ∂L/∂θ = (the grouped sum of ∂L/∂W and ∂L/∂b) · scale.

    It takes θ itself and reads the scaled θ every layer shares (`GPartState.shared_scaled_theta`), applying the
    chain rule of the scaling in backward (`GPartState.theta_grad`): one d-sized copy per step rather than one per
    layer saved for backward, no autograd nodes for the scaling, and the d-sized gradient scaled in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, theta, state, groups, adapt_bias, transposed, training):
        dtype = _compute_dtype(x, weight)
        dropout = state.dropout(training)
        theta_s = state.shared_scaled_theta(weight.device, dropout=training)
        w = groups.build(weight, theta_s, dropout=dropout).to(dtype)
        b = groups.effective_bias(bias, theta_s) if adapt_bias else bias
        ctx.save_for_backward(x, weight, bias, theta_s)  # not w: backward rebuilds it (docs/design.md §3.1)
        ctx.state, ctx.groups, ctx.adapt_bias, ctx.dtype, ctx.transposed, ctx.training, ctx.dropout = (
            state, groups, adapt_bias, dtype, transposed, training, dropout)
        with _no_autocast(x):
            return _linear(x.to(dtype), w, None if b is None else b.to(dtype), transposed)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, theta_s = ctx.saved_tensors
        groups, dtype, transposed = ctx.groups, ctx.dtype, ctx.transposed
        gy = grad_y.to(dtype).reshape(-1, grad_y.shape[-1])  # (B*T, out)
        x2 = x.to(dtype).reshape(-1, x.shape[-1])             # (B*T, in)
        grad_x = grad_w = grad_b = grad_theta = None
        if ctx.needs_input_grad[0]:
            w = groups.build(weight, theta_s, dropout=ctx.dropout).to(dtype)
            grad_x = (gy @ (w.t() if transposed else w)).view(*x.shape[:-1], -1).to(x.dtype)
            del w  # one W-sized buffer at a time
        if ctx.needs_input_grad[1]:  # only when the user unfroze the base weight
            gw = gy.t() @ x2
            grad_w = (gw.t() if transposed else gw).to(weight.dtype)
        scaling = None
        if ctx.needs_input_grad[3]:
            # θ's chain rule rides along the grouped sum (one pass over d instead of three on the CPU), unless the
            # bias gradient must join the sum before it is scaled.
            scaling = None if ctx.adapt_bias else ctx.state.grad_scaling(ctx.training, gy.device)
            grad_theta = groups.weight_grad(gy, x2, transposed, ctx.dropout, scaling)
        if bias is not None and (ctx.needs_input_grad[2] or (ctx.adapt_bias and grad_theta is not None)):
            gb = gy.sum(0)
            grad_b = gb.to(bias.dtype) if ctx.needs_input_grad[2] else None
            if ctx.adapt_bias and grad_theta is not None:
                groups.add_bias_grad(grad_theta, gb)
        if grad_theta is not None:
            grad_theta = ctx.state.theta_grad(grad_theta, ctx.training, scaled=scaling is not None)
        return grad_x, grad_w, grad_b, grad_theta, None, None, None, None, None


class GPartDeltaFunction(torch.autograd.Function):
    """x ΔW^T alone, for a quantized base computed by its own layer (y = base(x) + x ΔW^T, docs/design.md §3.5).

    Like the full Function it takes θ, saves only x and the scaled θ, and rebuilds ΔW in backward.
    """

    @staticmethod
    def forward(ctx, x, theta, state, groups, shape, dtype, device, training):
        dropout = state.dropout(training)
        theta_s = state.shared_scaled_theta(device, dropout=training)
        ctx.save_for_backward(x, theta_s)
        ctx.state, ctx.groups, ctx.shape, ctx.dtype, ctx.training, ctx.dropout = (state, groups, shape, dtype,
                                                                                  training, dropout)
        with _no_autocast(x):
            return F.linear(x.to(dtype), groups.build(None, theta_s, shape=shape, dtype=dtype, dropout=dropout))

    @staticmethod
    def backward(ctx, grad_y):
        x, theta_s = ctx.saved_tensors
        gy = grad_y.to(ctx.dtype).reshape(-1, grad_y.shape[-1])
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            delta = ctx.groups.build(None, theta_s, shape=ctx.shape, dtype=ctx.dtype, dropout=ctx.dropout)
            grad_x = (gy @ delta).view(*x.shape[:-1], -1).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_theta = ctx.groups.weight_grad(gy, x.to(ctx.dtype).reshape(-1, x.shape[-1]), False, ctx.dropout)
            grad_theta = ctx.state.theta_grad(grad_theta, ctx.training)
        return grad_x, grad_theta, None, None, None, None, None, None


class GPartLinear(nn.Module):
    """Wraps a frozen `nn.Linear` or transformers `Conv1D` (`base_layer`) with a slice of the partition.

    The layer owns no trainable state: theta lives in the shared `GPartState`, reached through `state`;
    `groups` says where its weights (then bias) sit in the partition. A quantized base is kept as it is and
    the update is added to its output. theta is moved to the layer's device (a model split over GPUs), and
    its gradient flows back to theta's own device through that move.
    """

    def __init__(self, base_layer: nn.Module, state: nn.Module, groups: LayerGroups, adapt_bias: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "state", state)  # shared, registered once at the model root
        self.groups = groups
        self.adapt_bias = adapt_bias
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W as (in, out)
        self.quantized = is_quantized(base_layer)

    @property
    def device(self) -> torch.device:
        """Where the layer computes: its base weight's device (θ is brought here)."""
        return self.base_layer.weight.device

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the base weight (differentiable in theta; no dropout)."""
        theta_s = self.state.scaled_theta(self.device)
        return self.groups.build(None, theta_s, shape=weight_shape(self.base_layer), dtype=torch.float32)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + ΔW, b0 + Δb) in the base dtype: what merging writes into the base layer (no dropout)."""
        if self.quantized:
            raise GpartError("merging into a 4/8-bit quantized base would re-quantize W0 + ΔW and lose the update; "
                             "merge into an unquantized copy instead: gpart merge BASE ADAPTER -o DIR --dtype bfloat16")
        theta_s = self.state.scaled_theta(self.device).detach()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        w = self.groups.build(weight.detach(), theta_s)
        b = self.groups.effective_bias(bias.detach(), theta_s) if self.adapt_bias else bias
        return w, b

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, x)  # the activations' dtype, or autocast's
        shape = weight_shape(self.base_layer)
        theta = self.state.theta
        if not (torch.is_grad_enabled() and theta.requires_grad):
            theta = theta.detach()
        delta = GPartDeltaFunction.apply(x, theta, self.state, self.groups, shape, dtype, self.device, self.training)
        return self.base_layer(x) + delta.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return self._forward_quantized(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if torch.is_grad_enabled() and (self.state.theta.requires_grad or weight.requires_grad):
            return GPartLinearFunction.apply(x, weight, bias, self.state.theta, self.state, self.groups,
                                             self.adapt_bias, self.transposed, self.training)
        # No gradient: build W_eff for this call only (at most one extra weight copy alive at a time).
        theta_s = self.state.shared_scaled_theta(self.device, dropout=self.training)
        dtype = _compute_dtype(x, weight)
        w = self.groups.build(weight, theta_s, dropout=self.state.dropout(self.training)).to(dtype)
        b = self.groups.effective_bias(bias, theta_s) if self.adapt_bias else bias
        return _linear(x.to(dtype), w, None if b is None else b.to(dtype), self.transposed)


def supported(module: nn.Module) -> bool:
    """Whether GPart can wrap this module type (bitsandbytes 4/8-bit linears subclass nn.Linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def check_supported(name: str, module: nn.Module) -> None:
    if not supported(module):
        raise GpartError(f"target module {name!r} is a {type(module).__name__}; GPart adapts nn.Linear and "
                         f"transformers Conv1D layers. Narrow target_modules to linear layers")
