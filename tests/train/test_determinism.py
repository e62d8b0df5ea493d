"""`train.deterministic: true`: deterministic algorithms on, and GPart's kernels reduce ∂L/∂θ in int64
fixed point (order-free, so bit-reproducible on a GPU). The GPU half of the claim is `tests/kernels/test_kernels.py`'s
`test_compiled_deterministic_reduction_is_bit_reproducible` and `benchmarks/kernel_check.py`."""

import os

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.core.model import compute_path
from gpart_cli.train.run import run
from tests.conftest import DEVICE, glue_recipe, tiny_llama


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def _theta_grad(model, tokens):
    gpart.theta(model).grad = None
    model(tokens).logits.square().mean().backward()
    return gpart.theta(model).grad.clone()


@pytest.mark.slow
def test_kernels_use_the_fixed_point_reduction_under_deterministic_algorithms(tokens, monkeypatch,
                                                                              restore_determinism):
    model = gpart.apply(tiny_llama().to(DEVICE), gpart.GPartConfig(d=24, target_modules=["q_proj", "v_proj"]))
    tokens = tokens.to(DEVICE)
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(24, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setenv("GPART_TRITON", "0")
    reference = _theta_grad(model, tokens)
    monkeypatch.setenv("GPART_TRITON", "1")  # the kernels, under Triton's interpreter here
    torch.use_deterministic_algorithms(True)
    runs = [_theta_grad(model, tokens) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], reference, rtol=1e-6, atol=1e-9)
    assert compute_path(model).endswith("· deterministic ∂L/∂θ reduction")


@pytest.mark.slow
def test_deterministic_recipe_switches_torch_over_and_is_recorded(tiny_bert_dir, sst2_files, tmp_path,
                                                                  restore_determinism):
    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=3, train__eval_before=False,
                         train__deterministic=True)
    run(recipe, tmp_path / "a")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    run(recipe, tmp_path / "b")
    a, b = (gpart.read_artifact(tmp_path / d / "adapter.gpart") for d in "ab")
    assert torch.count_nonzero(a.theta) > 0 and torch.equal(a.theta, b.theta)
    assert a.meta["compute"]["deterministic"] is True and a.meta["recipe"]["train"]["deterministic"] is True


def test_deterministic_false_leaves_torch_alone(restore_determinism):
    from gpart_cli.train.determinism import configure

    configure(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
