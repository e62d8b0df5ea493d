"""The compiled CPU loops: the same bits as torch's ops, one warning and torch ops when they cannot run."""

import copy
import warnings

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.core.layer import GPartLinear
from gpart_cli.core.model import compute_path
from gpart_cli.errors import GpartError
from gpart_cli.kernels import cpu_native
from gpart_cli.kernels.delta_ops import torch_build, torch_grouped_add
from tests.conftest import tiny_llama

# The tests that run the loops need a C compiler with OpenMP, as this project's CI machine has; elsewhere the
# fallback tests below still run.
needs_cc = pytest.mark.skipif(not cpu_native.has_compiler(), reason="no C compiler: the torch ops run instead")


@pytest.fixture(autouse=True)
def fresh_library(monkeypatch):
    monkeypatch.delenv("GPART_CPU_KERNEL", raising=False)  # auto
    cpu_native.reset()
    yield
    cpu_native.reset()


def _problem(n, d, id_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, d, (n,), generator=g).to(id_dtype)
    return ids, torch.randn(d, generator=g), torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.1


@pytest.mark.slow
@needs_cc
def test_the_loops_compile_and_pass_their_self_check_here(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPART_CPU_KERNEL", "1")  # any failure is an error, not a fallback
    assert cpu_native.library() is not None
    built = list((tmp_path / "cpu-kernels").glob("gpart_cpu_*.so"))
    assert len(built) == 1
    assert list((tmp_path / "cpu-kernels").iterdir()) == built  # the temporary build directory is gone
    inode = built[0].stat().st_ino
    cpu_native.reset()
    cpu_native.library()  # a second process loads the cached library instead of compiling again
    assert list((tmp_path / "cpu-kernels").iterdir()) == built and built[0].stat().st_ino == inode


@pytest.mark.slow
@needs_cc
def test_a_corrupt_cached_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPART_CPU_KERNEL", "1")
    built = cpu_native._library_path(cpu_native._compiler())
    built.parent.mkdir(parents=True)
    built.write_bytes(b"\x7fELF" + bytes(96))  # left by a process killed mid-write (before writes were atomic)
    assert cpu_native.library() is not None
    assert built.stat().st_size > 1000 and list(built.parent.iterdir()) == [built]


@pytest.mark.slow
@needs_cc
def test_cc_may_carry_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPART_CPU_KERNEL", "1")
    monkeypatch.setenv("CC", "cc -Wall")  # as "ccache gcc" would
    assert cpu_native.library() is not None


@pytest.mark.slow
@needs_cc
def test_the_self_check_holds_under_a_float64_default_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPART_CPU_KERNEL", "1")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert cpu_native.library() is not None
    finally:
        torch.set_default_dtype(before)


@needs_cc
@pytest.mark.parametrize("id_dtype, d", [(torch.uint16, 65_536), (torch.int32, 70_000)])
@pytest.mark.parametrize("n", [384 * 384, 384 * 384 - 1])
@pytest.mark.parametrize("masked", [False, True])
def test_build_and_grouped_sum_give_torchs_bits(id_dtype, d, n, masked):
    ids, table, values, drop = _problem(n, d, id_dtype)
    drop = drop if masked else None
    w0 = torch.randn(n)
    assert torch.equal(cpu_native.build(w0, table, ids, drop), torch_build(w0, table, ids, drop))
    assert torch.equal(cpu_native.build(None, table, ids, drop), torch_build(None, table, ids, drop))
    held = torch.randn(2, d, generator=torch.Generator().manual_seed(1))  # the sums of the layers before
    got, want = held.clone(), held.clone()
    assert cpu_native.grouped_add(got, ids, values, drop)
    torch_grouped_add(want, ids, values.clone(), drop)
    assert torch.equal(got, want) and not torch.equal(got, held)
    if n % 2:  # an odd count goes into the first row alone
        assert torch.equal(got[1], held[1])


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_the_grouped_sum_does_not_depend_on_the_thread_count(threads):
    ids, _, values, _ = _problem(100_000, 1000, torch.uint16, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = torch.zeros(2, 1000)
        assert cpu_native.grouped_add(got, ids, values, None)
    finally:
        torch.set_num_threads(before)
    want = torch.zeros(2, 1000)
    torch_grouped_add(want, ids, values.clone())
    assert torch.equal(got, want)


def test_inputs_the_loops_do_not_cover_go_to_torch():
    ids, table, values, drop = _problem(64, 8, torch.uint16)
    assert cpu_native.build(torch.randn(64, dtype=torch.bfloat16), table, ids, None) is None
    assert cpu_native.build(None, table, ids.long(), None) is None
    assert cpu_native.build(torch.randn(63), table, ids, None) is None  # sizes the loops would trust
    assert cpu_native.build(None, table, ids, drop[:10]) is None
    assert cpu_native.build(None, table, ids, drop.to(torch.uint8)) is None
    rows = torch.zeros(2, 8)
    assert not cpu_native.grouped_add(rows, ids, values.double(), None)
    assert not cpu_native.grouped_add(rows, ids[::2], values[::2], None)  # not contiguous
    assert not cpu_native.grouped_add(rows, ids, values[:32], None)
    assert not cpu_native.grouped_add(torch.zeros(1, 8), ids, values, None)  # the CPU sums two halves
    assert not cpu_native.grouped_add(rows.t().contiguous().t(), ids, values, None)
    assert not torch.any(rows)
    with torch.enable_grad():  # autograd must see through it: torch ops
        assert cpu_native.build(None, table.requires_grad_(), ids, None) is None


def test_delta_weight_stays_differentiable_in_theta():
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=24, target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, GPartLinear))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.arange(24.0))
    delta = layer.delta_weight()
    assert delta.grad_fn is not None
    delta.square().sum().backward()
    # ΔW holds m_j weights θ_j/√n_j of group j (m_j of its n_j members sit in this layer):
    # ∂/∂θ_j Σ ΔW² = 2 θ_j m_j / n_j
    ids = layer.groups.ids(torch.device("cpu"))[: layer.groups.n_weight].long()
    m, n = torch.bincount(ids, minlength=24), gpart.group_sizes(layer.groups.n, 24)
    torch.testing.assert_close(gpart.theta(model).grad, 2 * torch.arange(24.0) * m / n, rtol=1e-6, atol=1e-6)
    assert (m > 0).sum() > 12  # the check covers most groups


def _trained_step(model, tokens):
    model.zero_grad()
    model.train()
    torch.manual_seed(5)  # without a trainer the dropout keys come from torch's RNG
    out = model(tokens).logits
    out.square().mean().backward()
    return out.detach(), gpart.theta(model).grad.clone()


@pytest.mark.slow
@needs_cc
def test_a_training_step_gives_the_same_bits_with_and_without_the_loops(monkeypatch, tokens):
    model = gpart.apply(tiny_llama(hidden=64), gpart.GPartConfig(d=512, target_modules=["q_proj", "v_proj"],
                                                                 dropout=0.1))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(512, generator=torch.Generator().manual_seed(0)) * 0.1)
    other = copy.deepcopy(model)
    assert cpu_native.library() is not None  # compiled and self-checked before the calls are counted
    calls = {"build": 0, "grouped_add": 0}
    for name in calls:
        real = getattr(cpu_native, f"_run_{name}")

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(cpu_native, f"_run_{name}", counted)
    loops = _trained_step(model, tokens)
    # 4 layers build W_eff in forward; on the CPU backward reuses it for ∂L/∂x (block 1; block 0's input is the
    # frozen embedding's output, which needs no gradient); one grouped sum per layer, into the step's one sink.
    assert calls == {"build": 4, "grouped_add": 4}
    monkeypatch.setenv("GPART_CPU_KERNEL", "0")
    torch_ops = _trained_step(other, tokens)
    assert calls == {"build": 4, "grouped_add": 4}
    assert torch.equal(loops[0], torch_ops[0]) and torch.equal(loops[1], torch_ops[1])


def test_no_compiler_falls_back_to_torch_ops_quietly_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    ids, table, values, _ = _problem(1000, 16, torch.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a GPU server without a compiler is normal: no warning
        assert cpu_native.build(None, table, ids, None) is None
        assert not cpu_native.grouped_add(torch.zeros(2, 16), ids, values, None)
        model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=24, target_modules=["q_proj"]))
        model(torch.randint(0, 90, (1, 5))).logits.sum().backward()  # the layer runs on torch ops
    assert gpart.theta(model).grad.shape == (24,)
    assert compute_path(model) == "reference path (CPU, torch ops) on cpu float32"


@needs_cc
def test_a_library_that_fails_to_compile_warns_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_native, "_SOURCE", cpu_native._SOURCE + "\nthis is not C;\n")
    ids, table, values, _ = _problem(1000, 16, torch.uint16)
    with pytest.warns(RuntimeWarning, match=r"compiled CPU loops are not used \(RuntimeError: cc could not compile "
                                            r"the loops: .*error.*\).*GPART_CPU_KERNEL=0"):
        assert cpu_native.build(None, table, ids, None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not cpu_native.grouped_add(torch.zeros(2, 16), ids, values, None)
    assert not list((tmp_path / "cpu-kernels").glob("*.so"))


@pytest.mark.slow
def test_no_compiler_is_an_error_that_names_the_fix_when_the_loops_are_required(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("GPART_CPU_KERNEL", "1")
    with pytest.raises(GpartError, match=r"GPART_CPU_KERNEL=1 asks for the compiled CPU loops, but no C compiler "
                                         r"\('no-such-compiler' is not on PATH\)\. To use them, install a C compiler "
                                         r"with OpenMP \(or set CC\); or unset GPART_CPU_KERNEL to use torch ops"):
        cpu_native.library()


@pytest.mark.slow
@needs_cc
def test_loops_that_disagree_with_torch_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    wrong = cpu_native._SOURCE.replace("row[ids[i]] += values[i]", "row[ids[i]] += 2 * values[i]")
    monkeypatch.setattr(cpu_native, "_SOURCE", wrong)
    with pytest.warns(RuntimeWarning, match=r"the grouped sum differs from torch's \(torch.uint16, mask=False, "
                                            r"n=1000\)"):
        assert cpu_native.library() is None


@pytest.mark.slow
def test_mode_zero_never_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPART_CPU_KERNEL", "0")
    assert cpu_native.library() is None
    assert not (tmp_path / "cpu-kernels").exists()


@pytest.mark.slow
def test_an_unknown_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("GPART_CPU_KERNEL", "yes")
    with pytest.raises(GpartError, match=r"GPART_CPU_KERNEL='yes' is not one of auto, 1, 0"):
        cpu_native.library()
