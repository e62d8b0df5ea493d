"""The authors' partitions on the kernel path: splitmix64-mod-v1 computed on the fly inside the Triton kernels
(bit-identical ids, ∂L/∂θ to fp64 accuracy; the exact W_eff build is tests/kernels/test_kernels.py's test, run for both
algorithms); torch-randint-v1 always on cached ids.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest).
"""

import copy

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.core.model import compute_path, gpart_layers, state_of
from gpart_cli.kernels.triton_gpart import grad_from_gemm, group_ids_triton
from gpart_cli.partition import RANDINT, SPLITMIX, group_ids
from tests.conftest import DEVICE, tiny_gpt2, tiny_llama

N, D, SEED, START = 50_000, 321, 2**63 + 11, 100


def _ids(start, count, d=D, seed=SEED):
    return group_ids(SPLITMIX, N, d, seed, start, count).long().to(DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("start,count,d,seed", [(0, 5000, 321, 0), (3, 4097, 23_040, 2**63 + 11),
                                                (2**40 + 5, 300, 1_000_003, 2**64 - 1), (2**33, 64, 1, 5)])
def test_kernel_splitmix_ids_are_bit_identical(start, count, d, seed):
    got = group_ids_triton(start + count, d, seed, start, count, DEVICE, algorithm=SPLITMIX).cpu()
    assert torch.equal(got, group_ids(SPLITMIX, start + count, d, seed, start, count))


@pytest.mark.slow
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_kernel_splitmix_gradient_matches_fp64(transposed, deterministic):
    g = torch.Generator().manual_seed(1)
    gy, x = torch.randn(37, 40, generator=g).to(DEVICE), torch.randn(37, 50, generator=g).to(DEVICE)
    grad = torch.zeros(D, device=DEVICE)
    grad_from_gemm(grad, gy, x, START, N, D, SEED, transposed, deterministic=deterministic, max_members=2000,
                   algorithm=SPLITMIX)
    gw = gy.double().t() @ x.double()
    flat = (gw.t() if transposed else gw).reshape(-1)
    ref = torch.zeros(D, dtype=torch.float64, device=DEVICE).index_add_(0, _ids(START, flat.numel()), flat)
    assert float((grad.double() - ref).norm() / ref.norm()) < 1e-6


def _pair(make, targets, partition, monkeypatch, tokens):
    """(reference-path model, kernel-path model, their logits) after one forward/backward each, same theta."""
    base = make().to(DEVICE)
    config = gpart.GPartConfig(d=48, seed=2**63 + 1, target_modules=targets, bias=True, partition=partition)
    ref = gpart.apply(copy.deepcopy(base), config)
    with torch.no_grad():
        gpart.theta(ref).copy_(torch.randn(48, generator=torch.Generator().manual_seed(0)))
    fused = copy.deepcopy(ref)
    monkeypatch.setenv("GPART_TRITON", "0")
    out_ref = ref(tokens).logits
    out_ref.square().mean().backward()
    monkeypatch.setenv("GPART_TRITON", "1")  # kernels on CUDA, or under the interpreter on CPU tensors
    out = fused(tokens).logits
    out.square().mean().backward()
    monkeypatch.setenv("GPART_TRITON", "0")
    return ref, fused, out_ref, out


@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_splitmix_layer_runs_on_the_kernels_with_zero_state(make, targets, monkeypatch, tokens):
    ref, fused, out_ref, out = _pair(make, targets, SPLITMIX, monkeypatch, tokens.to(DEVICE))
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gpart.theta(fused).grad, gpart.theta(ref).grad, rtol=1e-5, atol=1e-7)
    assert all(layer.groups.state_bytes() == 0 for _, layer in gpart_layers(fused))
    assert compute_path(fused).startswith("Triton kernels on")


def test_randint_layer_stays_on_cached_ids(monkeypatch, tokens):
    ref, fused, out_ref, out = _pair(tiny_llama, ["q_proj", "v_proj"], RANDINT, monkeypatch, tokens.to(DEVICE))
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(gpart.theta(fused).grad, gpart.theta(ref).grad, rtol=0, atol=0)
    assert all(layer.groups.state_bytes() > 0 for _, layer in gpart_layers(fused))
    assert not compute_path(fused).startswith("Triton kernels")
    assert state_of(fused).partition.algorithm == RANDINT
