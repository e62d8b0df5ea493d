"""The GPart layer (docs/design.md §1, §3): a frozen linear whose weight is W0 + ΔW, ΔW gathered from theta.

ΔW_i = theta_g(i) / sqrt(n_g(i)). The 1/sqrt(n_j) factor depends only on the group, so every layer of a step
shares one scaled theta (d values, `GPartState.layer_theta`) and gathers: ΔW = theta_scaled[g]. In backward each
layer adds its unscaled grouped sum of ∂L/∂W into the step's one buffer, and the node that scaled theta applies the
scale to d values once per step (`theta_grad`), never to N. `LayerGroups` decides how g is found: on-the-fly
Triton kernels on CUDA, cached ids (uint16 or int32) on the reference path.

A custom autograd Function saves x and the scaled theta. On a GPU it keeps nothing of the size of W between
forward and backward: backward rebuilds W_eff for ∂L/∂x, one layer at a time. On the CPU backward reuses forward's
W_eff, since there the rebuild costs about 1% of a step (docs/design.md §3.1).

Dropout on ΔW (method.dropout, as the authors apply `nn.Dropout` to ΔW) scales theta by 1/(1-p) and zeroes
the dropped weights of ΔW with a mask recomputed from a key (see `gpart_cli.rng`); it is off in eval mode.
Outside training no layer caches anything: each call builds its W_eff and drops it.

Which path each op takes (Triton kernels, compiled loops, torch ops) follows switches in the environment; a model
forward reads them once (`GPartState.switches`) and the layers hand them to every op of the forward and its
backward. A layer called outside a model forward reads them itself.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GpartError
from ..kernels.delta_ops import LayerGroups
from ..kernels.delta_ops import as_dtype as _cast
from ..kernels.dispatch import read_switches
from .quantized import is_quantized, weight_shape


def _autocast(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device type (`meta`, for shape-only tensors, has none)."""
    kind = x.device.type
    return kind != "meta" and torch.is_autocast_enabled(kind)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor, autocast: bool) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on, else the weight's."""
    return torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype


def _no_autocast(x: torch.Tensor, autocast: bool):
    return torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()


def _keeps_w_eff(w: torch.Tensor) -> bool:
    """Whether backward reuses forward's W_eff for ∂L/∂x instead of rebuilding it: on the CPU (docs/design.md §3.1)."""
    return w.is_cpu


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    # Conv1D (GPT-2 style) stores W as (in, out); nn.Linear as (out, in).
    return F.linear(x, w.t() if transposed else w, b)


class GPartLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b_eff; backward adds the grouped sum of ∂L/∂W (and ∂L/∂b) into the step's `GradSink`.

    It takes θ_s, the scaled θ every layer of the forward pass shares (`GPartState.layer_theta`), and returns no
    gradient for it: the node that made θ_s (`theta_grad.ScaledTheta`) turns the sink into ∂L/∂θ once, after the
    last layer. On the CPU, W_eff built in forward is kept for backward's ∂L/∂x; elsewhere backward rebuilds it, so
    nothing of the size of W is kept from forward to backward (docs/design.md §3.1).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, theta_s, sink, state, groups, adapt_bias, transposed, training, switches):
        autocast = _autocast(x)
        dtype = _compute_dtype(x, weight, autocast)
        dropout = state.dropout(training)
        w = _cast(groups.build(weight, theta_s, dropout=dropout, switches=switches), dtype)
        b = groups.effective_bias(bias, theta_s, switches) if adapt_bias else bias
        keep = ctx.needs_input_grad[0] and _keeps_w_eff(w)
        ctx.save_for_backward(x, weight, bias, theta_s, w if keep else None)
        ctx.sink, ctx.groups, ctx.adapt_bias, ctx.dtype, ctx.transposed, ctx.dropout, ctx.switches = (
            sink, groups, adapt_bias, dtype, transposed, dropout, switches)
        with _no_autocast(x, autocast):
            return _linear(_cast(x, dtype), w, None if b is None else _cast(b, dtype), transposed)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, theta_s, w = ctx.saved_tensors
        groups, dtype, transposed, switches = ctx.groups, ctx.dtype, ctx.transposed, ctx.switches
        gy = _cast(grad_y, dtype).reshape(-1, grad_y.shape[-1])  # (B*T, out)
        x2 = _cast(x, dtype).reshape(-1, x.shape[-1])             # (B*T, in)
        grad_x = grad_w = grad_b = None
        needs = ctx.needs_input_grad
        if needs[0]:
            if w is None:
                w = _cast(groups.build(weight, theta_s, dropout=ctx.dropout, switches=switches), dtype)
            grad_x = _cast((gy @ (w.t() if transposed else w)).view_as(x), x.dtype)
            del w  # one W-sized buffer at a time
        if needs[1]:  # only when the user unfroze the base weight
            gw = gy.t() @ x2
            grad_w = _cast(gw.t() if transposed else gw, weight.dtype)
        rows = ctx.sink.rows() if needs[3] else None
        if rows is not None:
            groups.add_weight_grad(rows, gy, x2, transposed, ctx.dropout, switches)
        if bias is not None and (needs[2] or (ctx.adapt_bias and rows is not None)):
            gb = gy.sum(0)
            grad_b = gb.to(bias.dtype) if needs[2] else None
            if ctx.adapt_bias and rows is not None:
                groups.add_bias_grad(rows[0], gb, switches)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class GPartDeltaFunction(torch.autograd.Function):
    """x ΔW^T alone, for a quantized base computed by its own layer (y = base(x) + x ΔW^T, docs/design.md §3.5).

    Like the full Function it takes θ_s and its sink, saves only x and θ_s, and rebuilds ΔW in backward.
    """

    @staticmethod
    def forward(ctx, x, theta_s, sink, state, groups, shape, dtype, training, switches):
        dropout = state.dropout(training)
        ctx.save_for_backward(x, theta_s)
        ctx.sink, ctx.groups, ctx.shape, ctx.dtype, ctx.dropout, ctx.switches = (
            sink, groups, shape, dtype, dropout, switches)
        with _no_autocast(x, _autocast(x)):
            delta = groups.build(None, theta_s, shape=shape, dtype=dtype, dropout=dropout, switches=switches)
            return F.linear(_cast(x, dtype), delta)

    @staticmethod
    def backward(ctx, grad_y):
        x, theta_s = ctx.saved_tensors
        gy = _cast(grad_y, ctx.dtype).reshape(-1, grad_y.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            delta = ctx.groups.build(None, theta_s, shape=ctx.shape, dtype=ctx.dtype, dropout=ctx.dropout,
                                     switches=ctx.switches)
            grad_x = _cast((gy @ delta).view_as(x), x.dtype)
        if ctx.needs_input_grad[1]:
            x2 = _cast(x, ctx.dtype).reshape(-1, x.shape[-1])
            ctx.groups.add_weight_grad(ctx.sink.rows(), gy, x2, False, ctx.dropout, ctx.switches)
        return grad_x, None, None, None, None, None, None, None, None


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

    def _forward_quantized(self, x: torch.Tensor, switches) -> torch.Tensor:
        dtype = _compute_dtype(x, x, _autocast(x))  # the activations' dtype, or autocast's
        shape = weight_shape(self.base_layer)
        theta_s, sink = self.state.layer_theta(self.device, self.training)
        delta = GPartDeltaFunction.apply(x, theta_s, sink, self.state, self.groups, shape, dtype, self.training,
                                         switches)
        return self.base_layer(x) + delta.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        switches = self.state.switches or read_switches()  # the model forward's, or read now (a call on its own)
        if self.quantized:
            return self._forward_quantized(x, switches)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if torch.is_grad_enabled() and (self.state.theta.requires_grad or weight.requires_grad):
            theta_s, sink = self.state.layer_theta(self.device, self.training)
            return GPartLinearFunction.apply(x, weight, bias, theta_s, sink, self.state, self.groups,
                                             self.adapt_bias, self.transposed, self.training, switches)
        # No gradient: build W_eff for this call only (at most one extra weight copy alive at a time).
        theta_s = self.state.shared_scaled_theta(self.device, dropout=self.training)
        dtype = _compute_dtype(x, weight, _autocast(x))
        w = _cast(self.groups.build(weight, theta_s, dropout=self.state.dropout(self.training), switches=switches),
                  dtype)
        b = self.groups.effective_bias(bias, theta_s, switches) if self.adapt_bias else bias
        return _linear(_cast(x, dtype), w, None if b is None else _cast(b, dtype), self.transposed)


def supported(module: nn.Module) -> bool:
    """Whether GPart can wrap this module type (bitsandbytes 4/8-bit linears subclass nn.Linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def check_supported(name: str, module: nn.Module) -> None:
    if not supported(module):
        raise GpartError(f"target module {name!r} is a {type(module).__name__}; GPart adapts nn.Linear and "
                         f"transformers Conv1D layers. Narrow target_modules to linear layers")
