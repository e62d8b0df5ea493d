"""∂L/∂θ of one backward pass, gathered from every adapted layer into one buffer (docs/design.md §3.1).

`ScaledTheta` is the autograd node that turns θ into θ_s = θ / √n (times 1/(1-p) under ΔW dropout) on one device;
every GPart layer of a forward pass on that device takes its output. In backward each layer adds its grouped sum
of ∂L/∂W into the node's `GradSink` instead of returning a d-sized gradient of its own, and returns none for θ_s.
Autograd runs a node only after every node that consumed its output, so `ScaledTheta.backward` runs after the last
layer: it adds the sink's rows, applies the chain rule of the scaling once and hands ∂L/∂θ to θ.

Per layer that saves a d-sized zeroed buffer, a pass that adds and scales it, and autograd's d-sized add of one
layer's gradient into the others'; per step it is one pass over d. The rows are tagged with the backward pass
(autograd's graph task) that wrote them: a pass that reaches the layers but not θ (`torch.autograd.grad` with
respect to the inputs only) leaves rows that the next pass drops instead of adding.
"""

from __future__ import annotations

import torch

from .delta_ops import combine_rows, sink_rows
from .torch_ops import Scaling, scale_grad


def _current_pass() -> int:
    return torch._C._current_graph_task_id()


class GradSink:
    """The grouped sums of ∂L/∂W of every layer of one forward pass on one device, unscaled, fp32 [rows, d]."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.d, self.device = d, device
        self._rows: torch.Tensor | None = None
        self._pass: int | None = None

    def rows(self) -> torch.Tensor:
        """The buffer a layer's backward adds into: zeroed at the first layer of each backward pass."""
        current = _current_pass()
        if self._rows is None or self._pass != current:
            self._rows, self._pass = torch.zeros(sink_rows(self.device), self.d, device=self.device), current
        return self._rows

    def take(self) -> torch.Tensor | None:
        """This pass's rows (then forgotten), or None when no layer wrote in this pass."""
        rows = self._rows if self._pass == _current_pass() else None
        self._rows = self._pass = None
        return rows


class ScaledTheta(torch.autograd.Function):
    """θ_s = (θ · 1/√n, then · 1/(1-p) when `dropout`) on `device`; backward: ∂L/∂θ from the sink's rows."""

    @staticmethod
    def forward(ctx, theta, scale: torch.Tensor, factor: float | None, device: torch.device, sink: GradSink):
        ctx.set_materialize_grads(False)  # the layers return no gradient for θ_s: backward gets None, not zeros
        ctx.scaling, ctx.sink, ctx.theta_device = (factor, scale), sink, theta.device
        return scale_theta(theta, scale, factor, device)

    @staticmethod
    def backward(ctx, grad_s):
        rows = ctx.sink.take()
        scaling = _on(ctx.scaling, ctx.sink.device)
        grad = None if rows is None else scale_grad(combine_rows(rows), scaling)
        if grad_s is not None:  # θ_s also used outside the layers' Functions
            extra = scale_grad(grad_s.float().clone(), scaling)
            grad = extra if grad is None else grad.add_(extra)
        if grad is not None and grad.device != ctx.theta_device:
            grad = grad.to(ctx.theta_device)
        return grad, None, None, None, None


def scale_theta(theta: torch.Tensor, scale: torch.Tensor, factor: float | None, device: torch.device | None
                ) -> torch.Tensor:
    """θ · scale (1/√n, or ones), then · factor (1/(1-p) under ΔW dropout), moved to `device`: the one definition of
    θ_s, differentiable when called with autograd on (`GPartState.scaled_theta`) and inside `ScaledTheta`."""
    theta_s = theta * scale
    if factor is not None:
        theta_s = theta_s * factor
    return theta_s if device is None or theta_s.device == device else theta_s.to(device)


def _on(scaling: Scaling, device: torch.device) -> Scaling:
    factor, scale = scaling
    return factor, (scale if scale.device == device else scale.to(device))


class _StepCache(dict):
    """A cache of one step's θ_s: a copy of the model (deepcopy, pickle) starts without it, as the graph it may
    hold belongs to this model's step."""

    def __deepcopy__(self, memo):
        return _StepCache()

    def __reduce__(self):
        return _StepCache, ()


class ThetaSCache:
    """θ_s computed once per θ value, device and scaling, and shared by every layer of a forward pass.

    One copy per step instead of one per layer is d·4 bytes per layer fewer (256 MB for d = 1M over 64 layers, when
    they were saved for backward). Entries are keyed by θ's version counter and storage (every in-place update, an
    optimizer step included, changes it); the owner clears the cache before each model forward (`clear`), which also
    covers edits through `theta.data` that bypass the version counter.
    """

    def __init__(self) -> None:
        self._shared = _StepCache()  # device -> (key, θ_s)
        self._graph = _StepCache()   # (device, factor) -> (key, θ_s, sink)

    def shared(self, theta: torch.Tensor, scale: torch.Tensor, factor: float | None, device: torch.device
               ) -> torch.Tensor:
        """θ_s without a graph (calls without autograd)."""
        key = (factor, theta._version, theta.data_ptr())
        cached = self._shared.get(device)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, scale_theta(theta, scale, factor, device))
            self._shared[device] = cached
        return cached[1]

    def for_layers(self, theta: torch.Tensor, scale: torch.Tensor, factor: float | None, device: torch.device
                   ) -> tuple[torch.Tensor, GradSink | None]:
        """θ_s for the layers' Functions and the sink their backward adds into: with autograd on and θ trainable,
        the output of one `ScaledTheta` node per device and scaling; otherwise `shared`'s θ_s and no sink."""
        if not (torch.is_grad_enabled() and theta.requires_grad):
            return self.shared(theta, scale, factor, device), None
        key = (theta._version, theta.data_ptr())
        cached = self._graph.get((device, factor))
        if cached is None or cached[0] != key:
            sink = GradSink(theta.shape[0], device)
            cached = (key, ScaledTheta.apply(theta, scale, factor, device, sink), sink)
            self._graph[(device, factor)] = cached
        return cached[1], cached[2]

    def clear(self) -> None:
        self._shared.clear()
        self._graph.clear()
