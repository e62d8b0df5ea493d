"""Quantized bases (bitsandbytes nf4/int8, here on its CPU backend): y = base(x) + x ΔWᵀ trains θ; merging
into the quantized base is refused with the way to merge into an unquantized copy instead.

bitsandbytes' CPU backend repacks a 4-bit layer for inference the first time it runs in eval mode without grad,
and that layout drops every gradient through the layer's input (see gpart_cli/core/quantized.py): `gpart.apply`
turns the repacking off, and reference bases here do the same (`keep_autograd_layout`) so both sides compute
the same quantized base.
"""

import pytest
import torch
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters.loading import ModelSource, load_model
from gpart_cli.commands.app import app
from gpart_cli.core.model import _set_module, gpart_layers, state_of
from gpart_cli.core.quantized import keep_autograd_layout
from gpart_cli.errors import GpartError
from gpart_cli.partition.feistel import group_ids, group_sizes

runner = CliRunner()


@pytest.fixture
def tokens(tokens):
    """On the device bitsandbytes loads the base to (the GPU when there is one)."""
    return tokens.to("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tests.conftest import tiny_llama

    out = tmp_path_factory.mktemp("qbase")
    tiny_llama(hidden=64).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_trains_theta_with_the_right_gradient(base_dir, kind, tokens):
    base = load_model(ModelSource(str(base_dir), quantization=kind), "causal_lm")
    keep_autograd_layout(base)  # the layout GPart computes in (bitsandbytes' CPU inference one is bf16)
    fresh = load_model(ModelSource(str(base_dir), quantization=kind), "causal_lm")  # deepcopy breaks bnb
    model = gpart.apply(fresh, gpart.GPartConfig(d=40, target_modules=["q_proj", "v_proj"]))
    layers = gpart_layers(model)
    assert all(layer.quantized for _, layer in layers)
    assert state_of(model).targets[0]["shape"] == [64, 64]  # logical shape, not the packed storage
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base(tokens).logits)  # θ = 0: exactly the quantized base
        gpart.theta(model).copy_(torch.randn(40, generator=torch.Generator().manual_seed(0)) * 0.01)
    model(tokens).logits.square().mean().backward()
    grad = gpart.theta(model).grad.double()
    # Reference: the same additive update with dense ΔW leaves.
    deltas = [layer.delta_weight().detach().requires_grad_(True) for _, layer in layers]
    hooks = [layer.base_layer.register_forward_hook(lambda m, a, out, dw=dw: out + a[0] @ dw.t())
             for (_, layer), dw in zip(layers, deltas)]
    for name, layer in layers:  # put the plain quantized layers back; the hooks add x ΔWᵀ
        _set_module(model, name, layer.base_layer)
    base_out = model(tokens).logits
    base_out.square().mean().backward()
    for h in hooks:
        h.remove()
    flat = torch.cat([dw.grad.flatten() for dw in deltas]).double()
    n = flat.numel()
    ref = torch.zeros(40, dtype=torch.float64).index_add_(0, group_ids(n, 40, 0).long(), flat.cpu())
    ref /= group_sizes(n, 40).double().sqrt()
    assert float((grad.cpu() - ref).norm() / ref.norm()) < 1e-4


def _theta_grad(model, tokens):
    gpart.theta(model).grad = None
    model(tokens).logits.square().mean().backward()
    return gpart.theta(model).grad.clone()


def test_evaluating_before_training_keeps_the_gradient(base_dir, tokens):
    """The bug this guards: an eval pass (as `gpart train` makes before training) let bitsandbytes repack the
    4-bit layers, after which θ's gradient was exactly 0."""
    models = []
    for _ in range(2):
        model = gpart.apply(load_model(ModelSource(str(base_dir), quantization="nf4"), "causal_lm"),
                            gpart.GPartConfig(d=40, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            gpart.theta(model).copy_(torch.randn(40, generator=torch.Generator().manual_seed(0)) * 0.01)
        models.append(model)
    with torch.no_grad():
        models[1].eval()(tokens)
    fresh, evaluated = (_theta_grad(m.train(), tokens) for m in models)
    assert torch.count_nonzero(fresh) == 40 and torch.equal(evaluated, fresh)


def test_a_base_repacked_before_apply_is_refused(base_dir):
    base = load_model(ModelSource(str(base_dir), quantization="nf4"), "causal_lm")
    # What an eval pass leaves behind on an AVX512-BF16 CPU (set directly, so any CPU runs this test).
    base.model.layers[1].mlp.up_proj.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(GpartError, match="'model.layers.1.mlp.up_proj' was repacked by bitsandbytes .* Load the base"):
        gpart.apply(base, gpart.GPartConfig(d=40, target_modules=["q_proj"]))


@pytest.mark.slow
def test_kernel_path_keeps_zero_bytes_per_parameter(base_dir, tokens, monkeypatch):
    """The additive ΔW path computes group ids on the fly like the full one (GPART_TRITON=1: kernels, here under
    Triton's interpreter) and gives the reference path's gradient."""
    model = gpart.apply(load_model(ModelSource(str(base_dir), quantization="int8"), "causal_lm"),
                        gpart.GPartConfig(d=40, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(40, generator=torch.Generator().manual_seed(0)) * 0.01)
    monkeypatch.setenv("GPART_TRITON", "0")
    reference = _theta_grad(model, tokens)
    for _, layer in gpart_layers(model):
        layer.groups.release()
    monkeypatch.setenv("GPART_TRITON", "1")
    fused = _theta_grad(model, tokens)
    assert all(layer.groups.state_bytes() == 0 for _, layer in gpart_layers(model))
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-9)


def test_merging_into_a_quantized_base_is_refused_and_explained(base_dir, tmp_path):
    base = load_model(ModelSource(str(base_dir), quantization="nf4"), "causal_lm")
    model = gpart.apply(base, gpart.GPartConfig(d=40, target_modules=["q_proj"]))
    with pytest.raises(GpartError, match="merge into an unquantized copy instead: gpart merge BASE ADAPTER"):
        gpart.merge(model)
    path = gpart.save(model, tmp_path / "a.gpart", recipe={"model": {"quantization": "nf4"}})
    # The CLI merge loads an unquantized copy of the base, so it works and gives a plain model.
    res = runner.invoke(app, ["merge", str(base_dir), str(path), "-o", str(tmp_path / "m"), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_bias_on_a_quantized_base_is_a_clear_error(base_dir):
    base = load_model(ModelSource(str(base_dir), quantization="int8"), "causal_lm")
    base.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(GpartError, match="bias: true is not supported on a quantized base"):
        gpart.apply(base, gpart.GPartConfig(d=8, target_modules=["q_proj"], bias=True))


def test_recipe_with_quantization_trains(tiny_llama_dir, tmp_path):
    from gpart_cli.recipe.schema import from_dict
    from gpart_cli.train.run import run
    from tests.conftest import ASSETS

    recipe = from_dict({
        "model": {"name_or_path": str(tiny_llama_dir), "quantization": "nf4"},
        "method": {"name": "gpart", "d": 64, "target_modules": ["q_proj", "v_proj"]},
        "data": {"family": "sft", "task": "gsm8k", "train_files": [str(ASSETS / "gsm8k" / "train.jsonl")],
                 "query_column": "question", "response_column": "answer", "max_train_samples": 12,
                 "dev_samples": 4, "max_length": 320},
        "train": {"max_steps": 2, "batch_size": 4, "lr_theta": 1e-2, "eval_before": False}, "name": "q"})
    results = run(recipe, tmp_path / "run")
    art = gpart.read_artifact(tmp_path / "run" / "adapter.gpart")
    assert results["trainable_params"] == 64 and torch.count_nonzero(art.theta) == 64
    assert art.meta["recipe"]["model"]["quantization"] == "nf4"
