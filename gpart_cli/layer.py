"""The GPart layer (DESIGN §1, §3): a frozen linear whose weight is W0 + ΔW, ΔW gathered from theta.

ΔW_i = theta_g(i) / sqrt(n_g(i)). The 1/sqrt(n_j) factor depends only on the group, so the layer
scales theta once (d values) and gathers: ΔW = theta_scaled[g]. In backward the grouped reduction runs on
the unscaled sum and autograd applies the scale to d values, never to N. `LayerGroups` decides how g is
found: cached int32 ids on CPU, on-the-fly Triton kernels on CUDA.

A custom autograd Function keeps nothing of the size of W between forward and backward: it saves x and
the (tiny) scaled theta, and rebuilds W_eff in backward for ∂L/∂x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GpartError
from .groups import LayerGroups


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    # Conv1D (GPT-2 style) stores W as (in, out); nn.Linear as (out, in).
    return F.linear(x, w.t() if transposed else w, b)


class GPartLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b_eff, with ∂L/∂theta_scaled = the grouped sum of ∂L/∂W (and ∂L/∂b)."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta_scaled, groups, adapt_bias, transposed):
        dtype = _compute_dtype(x, weight)
        w = groups.effective_weight(weight, theta_scaled).to(dtype)
        b = groups.effective_bias(bias, theta_scaled) if adapt_bias else bias
        ctx.save_for_backward(x, weight, bias, theta_scaled)
        ctx.groups, ctx.adapt_bias, ctx.dtype, ctx.transposed = groups, adapt_bias, dtype, transposed
        with torch.autocast(x.device.type, enabled=False):
            return _linear(x.to(dtype), w, None if b is None else b.to(dtype), transposed)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, theta_scaled = ctx.saved_tensors
        groups, dtype, transposed = ctx.groups, ctx.dtype, ctx.transposed
        gy = grad_y.to(dtype).reshape(-1, grad_y.shape[-1])  # (B*T, out)
        x2 = x.to(dtype).reshape(-1, x.shape[-1])             # (B*T, in)
        grad_x = grad_w = grad_b = grad_theta = None
        if ctx.needs_input_grad[0]:
            w = groups.effective_weight(weight, theta_scaled).to(dtype)
            grad_x = (gy @ (w.t() if transposed else w)).view(*x.shape[:-1], -1).to(x.dtype)
            del w
        if ctx.needs_input_grad[1]:  # only when the user unfroze the base weight
            gw = gy.t() @ x2
            grad_w = (gw.t() if transposed else gw).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_theta = torch.zeros_like(theta_scaled)
            groups.add_weight_grad(grad_theta, gy, x2, transposed)
        if bias is not None and (ctx.needs_input_grad[2] or (ctx.adapt_bias and grad_theta is not None)):
            gb = gy.sum(0)
            grad_b = gb.to(bias.dtype) if ctx.needs_input_grad[2] else None
            if ctx.adapt_bias and grad_theta is not None:
                groups.add_bias_grad(grad_theta, gb)
        return grad_x, grad_w, grad_b, grad_theta, None, None, None


class GPartDeltaFunction(torch.autograd.Function):
    """x ΔW^T alone, for a quantized base computed by its own layer (y = base(x) + x ΔW^T, DESIGN §3).

    Like the full Function it saves only x and theta and rebuilds ΔW in backward.
    """

    @staticmethod
    def forward(ctx, x, theta_scaled, groups, shape, dtype):
        ctx.save_for_backward(x, theta_scaled)
        ctx.groups, ctx.shape, ctx.dtype = groups, shape, dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), groups.delta_weight(theta_scaled, shape).to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, theta_scaled = ctx.saved_tensors
        gy = grad_y.to(ctx.dtype).reshape(-1, grad_y.shape[-1])
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            delta = ctx.groups.delta_weight(theta_scaled, ctx.shape).to(ctx.dtype)
            grad_x = (gy @ delta).view(*x.shape[:-1], -1).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_theta = torch.zeros_like(theta_scaled)
            ctx.groups.add_weight_grad(grad_theta, gy, x.to(ctx.dtype).reshape(-1, x.shape[-1]), False)
        return grad_x, grad_theta, None, None, None


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4/8-bit linear, whose packed weight cannot take W0 + ΔW directly."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The logical (out, in) shape of a target's weight, also for packed quantized weights."""
    if is_quantized(module):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


class GPartLinear(nn.Module):
    """Wraps a frozen `nn.Linear` or transformers `Conv1D` (`base_layer`) with a slice of the partition.

    The layer owns no trainable state: theta lives in the shared `GPartState`, reached through `state`;
    `groups` says where its weights (then bias) sit in the partition. A quantized base is kept as it is and
    the update is added to its output.
    """

    def __init__(self, base_layer: nn.Module, state: nn.Module, groups: LayerGroups, adapt_bias: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "state", state)  # shared, registered once at the model root
        self.groups = groups
        self.adapt_bias = adapt_bias
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W as (in, out)
        self.quantized = is_quantized(base_layer)
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the base weight (differentiable in theta)."""
        return self.groups.delta_weight(self.state.scaled_theta(), weight_shape(self.base_layer))

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + ΔW, b0 + Δb) in the base dtype: what merging writes into the base layer."""
        if self.quantized:
            raise GpartError("merging into a 4/8-bit quantized base would re-quantize W0 + ΔW and lose the update; "
                             "merge into an unquantized copy instead: gpart merge BASE ADAPTER -o DIR --dtype bfloat16")
        theta_s = self.state.scaled_theta().detach()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        w = self.groups.effective_weight(weight.detach(), theta_s)
        b = self.groups.effective_bias(bias.detach(), theta_s) if self.adapt_bias else bias
        return w, b

    def _cached_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Inference with a frozen theta: build W_eff once, rebuild only when theta changes.
        theta = self.state.theta
        key = (theta._version, theta.data_ptr(), theta.device, self.base_layer.weight.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self.merged_weights())
        return self._cache[1], self._cache[2]

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, x)  # the activations' dtype, or autocast's
        theta_s = self.state.scaled_theta()
        if not torch.is_grad_enabled() or not self.state.theta.requires_grad:
            theta_s = theta_s.detach()
        shape = weight_shape(self.base_layer)
        delta = GPartDeltaFunction.apply(x, theta_s, self.groups, shape, dtype)
        return self.base_layer(x) + delta.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return self._forward_quantized(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if torch.is_grad_enabled() and (self.state.theta.requires_grad or weight.requires_grad):
            self._cache = None
            return GPartLinearFunction.apply(x, weight, bias, self.state.scaled_theta(), self.groups,
                                             self.adapt_bias, self.transposed)
        w, b = self._cached_weights() if not self.training else self.merged_weights()
        dtype = _compute_dtype(x, weight)
        return _linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), self.transposed)


def supported(module: nn.Module) -> bool:
    """Whether GPart can wrap this module type (bitsandbytes 4/8-bit linears subclass nn.Linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def check_supported(name: str, module: nn.Module) -> None:
    if not supported(module):
        raise GpartError(f"target module {name!r} is a {type(module).__name__}; GPart adapts nn.Linear and "
                         f"transformers Conv1D layers. Narrow target_modules to linear layers")
