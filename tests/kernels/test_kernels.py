"""Triton kernels (docs/design.md §3.3) against the method's reference (`core/reference.py`) and the reference
path: bit-identical ids, exact W_eff, ∂L/∂θ to fp64.

With a GPU these run compiled on it; without one, in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set in conftest). bf16/fp16 are checked in both: the kernels upcast before tl.dot, so the interpreter computes
what the GPU does. `gpu_only` tests cover what only compiled kernels show; each has a CPU twin here.
"""

import copy

import pytest
import torch
from triton.runtime.interpreter import InterpreterBuilder

import gpart_cli as gpart
from gpart_cli import rng
from gpart_cli.core import reference
from gpart_cli.core.model import compute_path, gpart_layers
from gpart_cli.kernels import launch
from gpart_cli.kernels.triton_gpart import build_weight, fixed_point_scale, grad_from_gemm, group_ids_triton
from gpart_cli.partition import FEISTEL, SPLITMIX, Partition
from tests.conftest import DEVICE, GPU, gpu_only, tiny_gpt2, tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N, D, SEED, START = 50_000, 321, 3, 100
DROP = (rng.drop_threshold(0.3), 0xABCDEF0123)


def _delta(theta_s, start, count, algorithm=FEISTEL, seed=SEED):
    """The reference ΔW of the weights [start, start + count) for an already scaled θ_s: θ_s[g], flat."""
    return reference.delta(theta_s, Partition(algorithm, N, D, seed), isometric=False)[start:start + count]


def _dense_grad(gy, x, transposed, dropout=None, start=START):
    """∂L/∂θ_s in fp64 by autograd through the reference: of Σ ∂L/∂W ⊙ ΔW, ∂L/∂W = gyᵀx shaped like W (Conv1D:
    transposed), the dropped weights' entries zero. The kernels reduce this grouped sum unscaled."""
    gw = gy.double().t() @ x.double()
    flat = (gw.t() if transposed else gw).reshape(-1)
    if dropout is not None:
        flat = flat.masked_fill(rng.drop_mask(start, flat.numel(), dropout[1], dropout[0], DEVICE), 0.0)
    theta_s = torch.zeros(D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    (_delta(theta_s, start, flat.numel()) * flat).sum().backward()
    return theta_s.grad


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.slow
@pytest.mark.parametrize("n,d,seed", [(10, 3, 0), (12345, 100, 42), (70_001, 999, 7)])
def test_kernel_group_ids_are_bit_identical(n, d, seed):
    want = reference.group_of(Partition(FEISTEL, n, d, seed)).int()
    assert torch.equal(group_ids_triton(n, d, seed, 0, n, DEVICE).cpu(), want)
    assert torch.equal(group_ids_triton(n, d, seed, 3, n - 5, DEVICE).cpu(), want[3:n - 2])


@pytest.mark.slow
def test_kernel_group_ids_past_2_31():
    # Global indices beyond int32 (a layer deep inside an 8B model's all-linear partition).
    n, start = 3 * 2**31 + 17, 2**32 + 5
    assert torch.equal(group_ids_triton(n, 1000, 1, start, 300, DEVICE).cpu(), gpart.group_ids(n, 1000, 1, start, 300))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, seed", [(FEISTEL, SEED), (SPLITMIX, 2**63 + 11)])  # the authors': seed >= 2^63
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [None, DROP])
def test_kernel_build_is_bit_exact(dtype, dropout, algorithm, seed):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 50, generator=g).to(DEVICE, dtype)
    theta = torch.randn(D, generator=g).to(DEVICE)
    delta = _delta(theta, START, 2000, algorithm, seed)
    if dropout is not None:
        delta = delta.masked_fill(rng.drop_mask(START, 2000, dropout[1], dropout[0], DEVICE), 0.0)
    got = build_weight(w, theta, START, N, D, seed, dropout=dropout, algorithm=algorithm)
    assert got.dtype == dtype and torch.equal(got, (w.float() + delta.view(40, 50)).to(dtype))  # one fp32 sum, RNE
    alone = build_weight(None, theta, START, N, D, seed, shape=(40, 50), dtype=dtype, dropout=dropout,
                         algorithm=algorithm)
    assert torch.equal(alone, delta.view(40, 50).to(dtype))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dropout", [None, DROP])
def test_fused_gemm_reduction_matches_fp64(dtype, transposed, dropout):
    g = torch.Generator().manual_seed(1)
    gy, x = torch.randn(37, 40, generator=g).to(DEVICE, dtype), torch.randn(37, 50, generator=g).to(DEVICE, dtype)
    grad = torch.zeros(D, device=DEVICE)
    grad_from_gemm(grad, gy, x, START, N, D, SEED, transposed, dropout=dropout)
    # bf16/fp16 products are exact after the upcast: the only error left is fp32 accumulation.
    assert _rel(grad, _dense_grad(gy, x, transposed, dropout)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_reduction_is_accurate_and_repeatable(dtype):
    g = torch.Generator().manual_seed(2)
    gy, x = torch.randn(70, 40, generator=g).to(DEVICE, dtype), torch.randn(70, 50, generator=g).to(DEVICE, dtype)
    runs = []
    for _ in range(2):
        grad = torch.zeros(D, device=DEVICE)
        grad_from_gemm(grad, gy, x, START, N, D, SEED, False, deterministic=True, max_members=-(-N // D))
        runs.append(grad)
    assert torch.equal(runs[0], runs[1])
    assert _rel(runs[0], _dense_grad(gy, x, False)) < 1e-6


def test_fixed_point_scale_leaves_room_for_every_group_sum():
    # Worst case the bound allows: every product at its maximum, every member of a group in one layer.
    gy, x = torch.full((64, 8), -3.0e4), torch.full((64, 8), 2.0e4)
    scale = float(fixed_point_scale(gy, x, max_members=500))
    worst = 64 * 3.0e4 * 2.0e4 * 500 * scale
    assert 2**60 <= worst < 2**62  # uses the range (precision) without overflowing int64
    assert float(fixed_point_scale(torch.zeros(4, 2), torch.zeros(4, 2), 3)) == 2.0**1000  # all-zero: finite


@pytest.mark.slow
def test_int64_offsets_past_2_31_elements():
    """2,049 token rows 2**20 elements apart: the last row starts at element 2**31, so row * stride overflows
    int32 although both factors fit in it (131k tokens x an 18,944-wide MLP is the real-world case).

    The 4 GiB bf16 buffers are allocated lazily by the OS; only the rows used are ever touched (8 MiB).
    """
    rows, stride = 2049, 2**20
    g = torch.Generator().manual_seed(3)
    tensors = []
    for width in (40, 48):
        storage = torch.empty((rows - 1) * stride + width, dtype=torch.bfloat16, device=DEVICE)
        view = torch.as_strided(storage, (rows, width), (stride, 1))
        view.copy_(torch.randn(rows, width, generator=g).to(torch.bfloat16))
        tensors.append(view)
    gy, x = tensors
    grad = torch.zeros(D, device=DEVICE)
    grad_from_gemm(grad, gy, x, START, N, D, SEED, False)
    assert _rel(grad, _dense_grad(gy.contiguous(), x.contiguous(), False)) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(GPU, reason="inspects Triton's interpreter, which only runs without a GPU")
def test_every_kernel_address_offset_is_int64(monkeypatch):
    """The reasoned bound for what the test above cannot allocate (a weight of 2**31 elements): every pointer
    offset any kernel forms is int64, and each is built from int64 program ids, aranges and strides."""
    seen = []
    original = InterpreterBuilder.create_addptr

    def record(self, ptr, offset):
        seen.append(offset.data.dtype)
        return original(self, ptr, offset)

    monkeypatch.setattr(InterpreterBuilder, "create_addptr", record)
    theta = torch.randn(D)
    build_weight(torch.randn(40, 50), theta, START, N, D, SEED, dropout=DROP)
    build_weight(None, theta, START, N, D, SEED, shape=(40, 50), dtype=torch.bfloat16)
    group_ids_triton(N, D, SEED, START, 2000, "cpu")
    for deterministic in (False, True):
        grad_from_gemm(torch.zeros(D), torch.randn(37, 40), torch.randn(37, 50), START, N, D, SEED, True,
                       dropout=DROP, deterministic=deterministic, max_members=200)
    assert seen and {str(t) for t in seen} == {"int64"}


@pytest.fixture
def allow_tf32():
    """Set torch.backends.cuda.matmul.allow_tf32 for a test (a property monkeypatch cannot undo)."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_(value: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = before


def test_dot_precision_follows_torch_tf32_setting(monkeypatch, allow_tf32):
    """CPU twin of the compiled TF32 check: the precision each dtype and GPU generation gets."""
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    allow_tf32(False)
    assert launch.dot_precision(torch.float32, cuda) == ("ieee", False)
    assert launch.dot_precision(torch.bfloat16, cuda) == ("tf32", True)  # exact: bf16 values fit in tf32
    allow_tf32(True)
    assert launch.dot_precision(torch.float32, cuda) == ("tf32", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: no tf32
    assert launch.dot_precision(torch.float32, cuda) == ("ieee", False)
    assert launch.dot_precision(torch.float16, cuda) == ("ieee", True)
    assert launch.dot_precision(torch.float32, torch.device("cpu")) == ("ieee", False)


@pytest.mark.slow
@gpu_only
def test_compiled_fp32_gradient_is_full_precision_unless_tf32_allowed(allow_tf32):
    g = torch.Generator().manual_seed(4)
    gy, x = torch.randn(512, 256, generator=g).cuda(), torch.randn(512, 192, generator=g).cuda()
    errors = {}
    for allow in (False, True):
        allow_tf32(allow)
        grad = torch.zeros(D, device="cuda")
        grad_from_gemm(grad, gy, x, START, 2**20, D, SEED, False)
        errors[allow] = _rel(grad, _dense_grad(gy, x, False))
    assert errors[False] < 1e-6 < errors[True] < 1e-2


@pytest.mark.slow
@gpu_only
def test_compiled_deterministic_reduction_is_bit_reproducible():
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(4096, 512, generator=g).cuda().bfloat16()
    x = torch.randn(4096, 384, generator=g).cuda().bfloat16()
    runs = []
    for _ in range(5):
        grad = torch.zeros(64, device="cuda")
        grad_from_gemm(grad, gy, x, 0, 512 * 384, 64, SEED, False, deterministic=True, max_members=3072)
        runs.append(grad)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.slow
@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_layer_on_the_kernel_path_matches_the_reference_path(make, targets, monkeypatch, tokens):
    base = make().to(DEVICE)
    ref = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=48, target_modules=targets, bias=True))
    with torch.no_grad():
        gpart.theta(ref).copy_(torch.randn(48, generator=torch.Generator().manual_seed(0)))
    fused = copy.deepcopy(ref)
    tokens = tokens.to(DEVICE)
    monkeypatch.setenv("GPART_TRITON", "0")
    ref(tokens).logits.square().mean().backward()
    monkeypatch.setenv("GPART_TRITON", "1")  # kernels on CUDA, or under the interpreter on CPU tensors
    out = fused(tokens).logits
    out.square().mean().backward()
    monkeypatch.setenv("GPART_TRITON", "0")
    torch.testing.assert_close(out, ref(tokens).logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(gpart.theta(fused).grad, gpart.theta(ref).grad, rtol=1e-5, atol=1e-7)
    # The kernel path never built the int32 id cache: zero bytes of partition state.
    assert all(layer.groups.state_bytes() == 0 for _, layer in gpart_layers(fused))
    assert compute_path(fused).startswith("Triton kernels on")


@pytest.mark.slow
def test_kernel_check_script_runs_here():
    """benchmarks/kernel_check.py: the GPU checks on a GPU; here it says what it skipped and exits 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_check.py"
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=1800)
    report = json.loads(res.stdout)
    assert res.returncode == 0, res.stderr
    if GPU:
        assert report["ok"] is True and set(report["checks"]) >= {"selfcheck", "kernels", "layer", "determinism"}
    else:
        assert report["device"] == "cpu" and report["checks"] == {}
        assert set(report["skipped"]) == {"selfcheck", "kernels", "layer", "determinism", "multi_gpu", "timings"}
