"""GPart's fixed cost per layer per step: a training step of many tiny layers, where the arithmetic is nothing.

    python benchmarks/layer_overhead.py                 # 24 layers of 16x16, 300 steps
    python benchmarks/layer_overhead.py --layers 48 --width 32

Three stacks of the same linear layers, each stepped forward + backward on a (4, width) input that requires grad:
- gpart: the layers adapted by GPart (d = 64), θ trainable;
- bare_function: the same layers through a minimal custom autograd Function (F.linear forward; backward computes
  ∂L/∂x, ∂L/∂W and returns a d-sized gradient), the floor of any Function-based method;
- linear: plain nn.Linear with trainable weights (autograd's own nodes).
What gpart costs above bare_function is the layer's Python, dispatch and the compiled loops' calls: the part of a
CPU step that does not shrink with the shapes (`docs/performance.md` §3). Prints one JSON object (µs per step and
per layer).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import gpart_cli as gpart


class _Stack(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _BareFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, theta):
        ctx.save_for_backward(x, weight)
        ctx.d = theta.numel()
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gy.t() @ x  # the ∂L/∂W every random-partition method computes
        return gy @ weight, None, torch.zeros(ctx.d)


class _BareLayer(nn.Module):
    def __init__(self, linear: nn.Linear, theta: nn.Parameter) -> None:
        super().__init__()
        self.weight = linear.weight.requires_grad_(False)
        self.theta = theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BareFunction.apply(x, self.weight, self.theta)


def _stacks(layers: int, width: int, d: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    adapted = gpart.apply(_Stack(layers, width), gpart.GPartConfig(d=d, target_modules=r"layers\.\d+"))
    bare, theta = _Stack(layers, width), nn.Parameter(torch.zeros(d))
    bare.layers = nn.ModuleList(_BareLayer(layer, theta) for layer in bare.layers)
    return {"gpart": adapted.train(), "bare_function": bare, "linear": _Stack(layers, width)}


def _step_us(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    for _ in range(20):
        model(x).sum().backward()
    tick = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    return (time.perf_counter() - tick) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    x = torch.randn(4, args.width, requires_grad=True)
    per_step = {name: _step_us(model, x, args.steps) for name, model in _stacks(args.layers, args.width, 64).items()}
    print(json.dumps({"layers": args.layers, "width": args.width, "threads": torch.get_num_threads(),
                      "us_per_step": {k: round(v, 1) for k, v in per_step.items()},
                      "us_per_layer": {k: round(v / args.layers, 1) for k, v in per_step.items()},
                      "gpart_over_bare_function_us_per_layer":
                          round((per_step["gpart"] - per_step["bare_function"]) / args.layers, 1)}, indent=2))


if __name__ == "__main__":
    main()
