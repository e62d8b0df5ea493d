"""benchmarks/layer_overhead.py compares like with like: three stacks of the same shapes, each trained end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import layer_overhead  # noqa: E402

import gpart_cli as gpart  # noqa: E402
from gpart_cli.core.model import gpart_layers  # noqa: E402


def test_the_three_stacks_have_the_same_layers_and_each_gets_its_gradient():
    stacks = layer_overhead._stacks(layers=3, width=8, d=16)
    assert set(stacks) == {"gpart", "bare_function", "linear"}
    x = torch.randn(4, 8, requires_grad=True)
    for name, model in stacks.items():
        out = model(x)
        assert out.shape == (4, 8), name
        out.sum().backward()
    assert gpart.theta(stacks["gpart"]).grad.abs().sum() > 0
    assert len(gpart_layers(stacks["gpart"])) == 3
    assert all(layer.weight.grad is not None for layer in stacks["linear"].layers)
    assert x.grad is not None


@pytest.mark.slow
def test_the_script_prints_its_figures():
    script = Path(layer_overhead.__file__)
    res = subprocess.run([sys.executable, str(script), "--layers", "2", "--width", "8", "--steps", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["layers"] == 2 and report["width"] == 8
    assert set(report["us_per_step"]) == set(report["us_per_layer"]) == {"gpart", "bare_function", "linear"}
    assert all(v > 0 for v in report["us_per_step"].values())
