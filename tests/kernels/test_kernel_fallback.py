"""A bad kernel never breaks a run: self-check per class, one warning, the reference path instead.

`auto` mode only uses kernels on CUDA; here CPU tensors are let in (`kernels_on_cpu`) so the kernels run under
Triton's interpreter, and failing or wrong kernels are injected into `triton_gpart`.
"""

import copy
import json
import os
import sys

import pytest
import torch
import triton
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app
from gpart_cli.core.model import compute_path, gpart_layers
from gpart_cli.errors import GpartError
from gpart_cli.kernels import cpu_native, dispatch, launch, selfcheck, triton_gpart
from tests.conftest import DEVICE, GPU, tiny_llama


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv("GPART_TRITON", raising=False)  # auto
    dispatch.reset()
    yield
    dispatch.reset()


def _cpu() -> str:
    """The reason the CPU runs the reference path: "CPU, compiled loops", or "CPU, torch ops" without a compiler."""
    return f"CPU, {cpu_native.describe()}"


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Without a GPU, treat CPU tensors as auto mode treats CUDA ones (kernels run under the interpreter)."""
    if not GPU:
        real = dispatch._why_not
        monkeypatch.setattr(dispatch, "_why_not",
                            lambda device, switches=None: real(device, switches) if dispatch.mode() == "0" else None)


def _pair(d=24, device=DEVICE):
    ref = gpart.apply(tiny_llama().to(device), gpart.GPartConfig(d=d, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        gpart.theta(ref).copy_(torch.randn(d, generator=torch.Generator().manual_seed(0)))
    return ref, copy.deepcopy(ref)


def _step(model, tokens):
    out = model(tokens.to(gpart.theta(model).device)).logits
    out.square().mean().backward()
    return out.detach(), gpart.theta(model).grad.clone()


def _reference(model, tokens, monkeypatch):
    monkeypatch.setenv("GPART_TRITON", "0")
    result = _step(model, tokens)
    monkeypatch.delenv("GPART_TRITON")
    return result


@pytest.mark.slow
def test_a_failing_kernel_warns_once_and_the_run_continues_on_the_reference_path(kernels_on_cpu, monkeypatch, tokens):
    ref, model = _pair()
    want_out, want_grad = _reference(ref, tokens, monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed (simulated compile error)")

    monkeypatch.setattr(triton_gpart, "grad_from_gemm", broken)
    with pytest.warns(dispatch.KernelFallbackWarning) as caught:
        out, grad = _step(model, tokens)
        _step(model, tokens)  # a second step: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in ("'grad'", dispatch.device_name(DEVICE), "float32", f"Triton {triton.__version__}",
                 "simulated compile error", "reference path"):
        assert part in message
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)  # kernel build + reference reduction
    assert f"grad on {DEVICE} float32: reference: self-check failed: RuntimeError" in compute_path(model)
    assert f"build on {DEVICE} float32: triton" in compute_path(model)


@pytest.mark.slow
def test_a_wrong_kernel_is_caught_by_the_comparison(kernels_on_cpu, monkeypatch, tokens):
    ref, model = _pair()
    want_out, want_grad = _reference(ref, tokens, monkeypatch)
    real = triton_gpart.build_weight

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) + 1e-3

    monkeypatch.setattr(triton_gpart, "build_weight", off_by_a_little)
    with pytest.warns(dispatch.KernelFallbackWarning, match="W0 \\+ ΔW differs from the reference"):
        out, grad = _step(model, tokens)
    assert torch.equal(out, want_out)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-8)  # kernel reduction: fp32, another order
    assert f"build on {DEVICE} float32: reference: self-check failed" in compute_path(model)


@pytest.mark.slow
def test_a_triton_that_does_not_import_falls_back_too(kernels_on_cpu, monkeypatch, tokens):
    """Triton installed but broken (a driver or CUDA mismatch): the import fails inside the check, not the run."""
    import gpart_cli.kernels as kernels_package

    ref, model = _pair()
    want_out, want_grad = _reference(ref, tokens, monkeypatch)
    monkeypatch.delattr(kernels_package, "triton_gpart")
    monkeypatch.setitem(sys.modules, "gpart_cli.kernels.triton_gpart", None)  # import now raises ImportError
    with pytest.warns(dispatch.KernelFallbackWarning, match="Triton does not import: ModuleNotFoundError"):
        out, grad = _step(model, tokens)
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)


@pytest.mark.slow
def test_gpart_triton_1_turns_a_failed_check_into_an_error(monkeypatch, tokens):
    monkeypatch.setenv("GPART_TRITON", "1")  # kernels on CUDA, or on CPU tensors under the interpreter
    monkeypatch.setattr(triton_gpart, "build_weight", lambda *a, **k: torch.zeros(1))
    _, model = _pair()
    with pytest.raises(GpartError, match="'build' failed its self-check .* Unset GPART_TRITON"):
        model(tokens.to(DEVICE))


@pytest.mark.slow
def test_each_kernel_class_is_checked_once(kernels_on_cpu, monkeypatch, tokens):
    calls = []
    real = selfcheck.CHECKS.copy()
    for op in real:
        monkeypatch.setitem(selfcheck.CHECKS, op, lambda call, k, op=op: calls.append(call.key()) or real[op](call, k))
    _, model = _pair()
    _step(model, tokens)
    first = len(calls)
    assert first >= 2 and len(set(calls)) == first  # build and grad; q and v share their class
    _step(model, tokens)
    _step(copy.deepcopy(model), tokens)  # another model, same classes: the verdicts are per process
    assert len(calls) == first
    model.to(torch.bfloat16)(tokens.to(DEVICE)).logits.float().sum().backward()  # a new dtype is a new class
    assert len(calls) > first and all(k[2] == torch.bfloat16 for k in calls[first:])


@pytest.mark.slow
def test_modes(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    monkeypatch.setenv("GPART_TRITON", "0")
    assert dispatch._why_not(cuda) == "GPART_TRITON=0"
    monkeypatch.delenv("GPART_TRITON")
    assert dispatch._why_not(cuda) is None and dispatch._why_not(cpu) == _cpu()  # auto: CUDA only
    monkeypatch.setenv("GPART_TRITON", "1")  # CPU tensors only under the interpreter (set by conftest without a GPU)
    assert dispatch._why_not(cpu) == (None if os.environ.get("TRITON_INTERPRET") == "1" else _cpu())
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    with pytest.raises(GpartError, match="GPART_TRITON=1 .* Triton is not installed: pip install triton"):
        dispatch._why_not(cuda)
    monkeypatch.setenv("GPART_TRITON", "auto")
    assert dispatch._why_not(cuda) == "Triton is not installed"
    monkeypatch.setenv("GPART_TRITON", "yes")
    with pytest.raises(GpartError, match="GPART_TRITON='yes' is not one of auto, 1, 0"):
        dispatch.mode()


def test_reference_path_is_recorded_in_the_artifact_and_inspect(tmp_path, tokens):
    _, model = _pair(device="cpu")
    _step(model, tokens)
    assert compute_path(model) == f"reference path ({_cpu()}) on cpu float32"
    path = gpart.save(model, tmp_path / "a.gpart")
    compute = gpart.read_artifact(path).meta["compute"]
    assert {(p["op"], p["path"]) for p in compute["paths"]} == {("build", f"reference: {_cpu()}"),
                                                                ("grad", f"reference: {_cpu()}")}
    assert compute["deterministic"] is False and compute["triton"] == triton.__version__
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and f"reference path ({_cpu()}) on cpu float32" in res.output
    summary = json.loads(CliRunner().invoke(app, ["inspect", str(path), "--json"]).output)
    assert summary["compute_path"] == f"reference path ({_cpu()}) on cpu float32"


@pytest.mark.slow
def test_train_prints_the_compute_path(tiny_bert_dir, sst2_files, tmp_path):
    from io import StringIO

    from rich.console import Console

    from gpart_cli.train.run import run
    from tests.conftest import glue_recipe

    out = StringIO()
    run(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2, train__eval_before=False), tmp_path / "r",
        console=Console(file=out, width=200))
    assert f"GPart compute path: reference path ({_cpu()}) on cpu float32" in out.getvalue()


def test_device_guard_picks_the_tensor_device():
    guard = launch.device_guard(torch.device("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entered only at launch time
    assert not isinstance(launch.device_guard(torch.device("cpu")), torch.cuda.device)


def test_theta_is_brought_to_each_layer_device():
    """A model split over devices: a layer whose weight sits elsewhere than theta computes there (meta here)."""
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=24, target_modules=["q_proj", "v_proj"]))
    layer = gpart_layers(model)[0][1]
    layer.base_layer.to("meta")
    theta = gpart.theta(model)
    assert layer.device.type == "meta" and theta.device.type == "cpu"
    y = layer(torch.empty(2, 5, 32, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 32)
    assert theta.device.type == "cpu" and torch.count_nonzero(theta) == 0
    # theta stays where apply put it (the first target's device); the move to a layer is differentiable.
    moved = layer.state.scaled_theta(torch.device("meta"))
    assert moved.device.type == "meta" and moved.requires_grad and moved.grad_fn is not None
