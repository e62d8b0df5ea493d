"""The GPart layer (DESIGN §1, §3): a frozen linear whose weight is W0 + ΔW, ΔW gathered from theta.

ΔW_i = theta_g(i) / sqrt(n_g(i)). The 1/sqrt(n_j) factor depends only on the group, so the layer
scales theta once (d values) and gathers: ΔW = theta_scaled[ids]. In backward the grouped reduction runs
on the unscaled sum and autograd applies the scale to d values, never to N.

A custom autograd Function keeps nothing of the size of W between forward and backward: it saves x and
the (tiny) scaled theta, and rebuilds W_eff in backward for ∂L/∂x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GpartError


def effective(base: torch.Tensor, theta_scaled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW, summed in fp32 and rounded once to the base dtype."""
    delta = theta_scaled.index_select(0, ids).view(base.shape)
    if base.dtype == torch.float32:
        return base + delta
    return (base.float() + delta).to(base.dtype)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    # Conv1D (GPT-2 style) stores W as (in, out); nn.Linear as (out, in).
    return F.linear(x, w.t() if transposed else w, b)


class GPartLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b_eff, with ∂L/∂theta_scaled = index_add of ∂L/∂W (and ∂L/∂b) by group id."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta_scaled, w_ids, b_ids, transposed):
        dtype = _compute_dtype(x, weight)
        w = effective(weight, theta_scaled, w_ids).to(dtype)
        b = None if bias is None else (effective(bias, theta_scaled, b_ids) if b_ids is not None else bias)
        ctx.save_for_backward(x, weight, bias, theta_scaled, w_ids, b_ids)
        ctx.dtype, ctx.transposed = dtype, transposed
        with torch.autocast(x.device.type, enabled=False):
            return _linear(x.to(dtype), w, None if b is None else b.to(dtype), transposed)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, theta_scaled, w_ids, b_ids = ctx.saved_tensors
        dtype, transposed = ctx.dtype, ctx.transposed
        gy = grad_y.to(dtype).reshape(-1, grad_y.shape[-1])  # (B*T, out)
        grad_x = grad_w = grad_b = grad_theta = None
        if ctx.needs_input_grad[0]:
            w = effective(weight, theta_scaled, w_ids).to(dtype)
            grad_x = (gy @ (w.t() if transposed else w)).view(*x.shape[:-1], -1).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            gw = gy.t() @ x.to(dtype).reshape(-1, x.shape[-1])  # (out, in)
            gw = gw.t() if transposed else gw
            grad_w = gw.to(weight.dtype) if ctx.needs_input_grad[1] else None
            if ctx.needs_input_grad[3]:
                grad_theta = torch.zeros_like(theta_scaled)
                grad_theta.index_add_(0, w_ids, gw.reshape(-1).float())
                del gw
        if bias is not None and (ctx.needs_input_grad[2] or (b_ids is not None and grad_theta is not None)):
            gb = gy.sum(0)
            grad_b = gb.to(bias.dtype) if ctx.needs_input_grad[2] else None
            if b_ids is not None and grad_theta is not None:
                grad_theta.index_add_(0, b_ids, gb.float())
        return grad_x, grad_w, grad_b, grad_theta, None, None, None


class GPartLinear(nn.Module):
    """Wraps a frozen `nn.Linear` or transformers `Conv1D` (`base_layer`) with a slice of the partition.

    The layer owns no trainable state: theta lives in the shared `GPartState`, reached through `state`.
    `ids` holds the int32 group id of each of its adapted weights (then bias), 4 bytes per parameter.
    """

    def __init__(self, base_layer: nn.Module, state: nn.Module, offset: int, ids: torch.Tensor,
                 adapt_bias: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "state", state)  # shared, registered once at the model root
        self.offset = offset
        self.adapt_bias = adapt_bias
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W as (in, out)
        n_w = base_layer.weight.numel()
        self.register_buffer("gpart_ids", ids, persistent=False)
        self._n_w = n_w
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def w_ids(self) -> torch.Tensor:
        return self.gpart_ids[: self._n_w]

    @property
    def b_ids(self) -> torch.Tensor | None:
        return self.gpart_ids[self._n_w:] if self.adapt_bias else None

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the base weight."""
        theta_s = self.state.scaled_theta()
        return theta_s.index_select(0, self.w_ids).view(self.base_layer.weight.shape)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + ΔW, b0 + Δb) in the base dtype: what merging writes into the base layer."""
        theta_s = self.state.scaled_theta().detach()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        w = effective(weight.detach(), theta_s, self.w_ids)
        b = effective(bias.detach(), theta_s, self.b_ids) if self.adapt_bias else bias
        return w, b

    def _cached_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Inference with a frozen theta: build W_eff once, rebuild only when theta changes.
        theta = self.state.theta
        key = (theta._version, theta.data_ptr(), theta.device, self.base_layer.weight.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self.merged_weights())
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if torch.is_grad_enabled() and (self.state.theta.requires_grad or weight.requires_grad):
            self._cache = None
            return GPartLinearFunction.apply(x, weight, bias, self.state.scaled_theta(), self.w_ids,
                                             self.b_ids, self.transposed)
        w, b = self._cached_weights() if not self.training else self.merged_weights()
        dtype = _compute_dtype(x, weight)
        return _linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), self.transposed)


def supported(module: nn.Module) -> bool:
    """Whether GPart can wrap this module type."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def check_supported(name: str, module: nn.Module) -> None:
    if not supported(module):
        raise GpartError(f"target module {name!r} is a {type(module).__name__}; GPart adapts nn.Linear and "
                         f"transformers Conv1D layers. Narrow target_modules to linear layers")
