"""Triton kernels (DESIGN §3) against the reference path: bit-identical ids, exact W_eff, same ∂L/∂θ.

Without a GPU these run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest).
"""

import copy

import pytest
import torch

import gpart_cli as gpart
import gpart_cli.groups as groups_mod
from gpart_cli.kernels.triton_gpart import effective_weight, grad_theta_from_gemm, group_ids_triton
from gpart_cli.model import gpart_layers
from tests.conftest import tiny_gpt2, tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,d,seed", [(10, 3, 0), (12345, 100, 42), (70_001, 999, 7)])
def test_kernel_group_ids_are_bit_identical(n, d, seed):
    ids = group_ids_triton(n, d, seed, 0, n, DEVICE).cpu()
    assert torch.equal(ids, gpart.group_ids(n, d, seed))
    part = group_ids_triton(n, d, seed, 3, n - 5, DEVICE).cpu()
    assert torch.equal(part, gpart.group_ids(n, d, seed)[3:n - 2])


def test_kernel_effective_weight_is_exact():
    n, d, seed, start = 50_000, 321, 3, 777
    w = torch.randn(40, 50, device=DEVICE)
    theta = torch.randn(d, device=DEVICE)
    ids = gpart.group_ids(n, d, seed)[start:start + 2000].long().to(DEVICE)
    assert torch.equal(effective_weight(w, theta, start, n, d, seed), w + theta[ids].view(40, 50))


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_gemm_reduction_matches_index_add(transposed):
    n, d, seed, start = 50_000, 321, 3, 100
    gy, x = torch.randn(37, 40, device=DEVICE), torch.randn(37, 50, device=DEVICE)
    grad = torch.zeros(d, device=DEVICE)
    grad_theta_from_gemm(grad, gy, x, start, n, d, seed, transposed)
    gw = gy.t() @ x
    gw = gw.t() if transposed else gw
    ref = torch.zeros(d, device=DEVICE).index_add_(0, gpart.group_ids(n, d, seed)[start:start + 2000].long()
                                                   .to(DEVICE), gw.reshape(-1))
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_layer_on_the_kernel_path_matches_the_reference_path(make, targets, monkeypatch, tokens):
    base = make()
    ref = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=48, target_modules=targets, bias=True))
    with torch.no_grad():
        gpart.theta(ref).copy_(torch.randn(48, generator=torch.Generator().manual_seed(0)))
    fused = copy.deepcopy(ref)
    ref(tokens).logits.square().mean().backward()
    monkeypatch.setattr(groups_mod, "kernels_available", lambda device: True)
    out = fused(tokens).logits
    out.square().mean().backward()
    torch.testing.assert_close(out, ref(tokens).logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(gpart.theta(fused).grad, gpart.theta(ref).grad, rtol=1e-5, atol=1e-7)
    # The kernel path never built the int32 id cache of the weights: zero bytes of partition state.
    assert all(layer.groups.state_bytes() == 0 for _, layer in gpart_layers(fused))
