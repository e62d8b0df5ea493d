"""The authors' knobs: dropout on ΔW keyed per micro-batch, and θ's uniform init (`init_bound`)."""

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli import rng
from gpart_cli.commands.app import app
from gpart_cli.core.model import _set_module as set_module
from gpart_cli.core.model import gpart_layers, set_dropout_key, state_of
from gpart_cli.errors import GpartError
from gpart_cli.partition.feistel import group_ids, group_sizes
from gpart_cli.recipe.methods import prepare
from gpart_cli.recipe.schema import MethodSection, TrainSection, from_dict, load_recipe
from gpart_cli.train.run import run
from tests.conftest import DEVICE, glue_recipe, tiny_llama

P = 0.2
TARGETS = ["q_proj", "v_proj"]


def _model(p=P, d=40, **kw):
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=d, target_modules=TARGETS, dropout=p, **kw))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(d, generator=torch.Generator().manual_seed(0)) * 0.1)
    return model


class _MaskedDense(torch.nn.Module):
    def __init__(self, w0, delta, keep):
        super().__init__()
        self.w0, self.delta, self.keep = w0, delta, keep

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w0 + self.delta * self.keep / (1 - P))


def _grad(model, tokens):
    gpart.theta(model).grad = None
    out = model(tokens).logits
    out.square().mean().backward()
    return out.detach(), gpart.theta(model).grad.clone()


# ---- the counter hash ---------------------------------------------------------------------------------

def test_vectorised_hash_matches_the_scalar_definition_across_the_32_bit_boundary():
    key = rng.micro_batch_key(7, 123)
    start = 2**32 - 50
    assert [int(u) for u in rng.hashes(start, 100, key)] == [rng.hash_one(i, key) for i in range(start, start + 100)]
    assert rng.hash_one(0, 0) == 0 and rng.hash_one(1, 0) == rng.lowbias32_int(1)  # the definition's fixed points


def test_the_on_device_hash_gives_the_same_bits_as_numpy(monkeypatch):
    """GPUs without the Triton kernels hash masks with torch ops where the weights are (no host copy per call)."""
    monkeypatch.setattr(rng, "_TORCH_CHUNK", 37)  # many chunks, one of them across the 32-bit boundary
    key, thr = rng.micro_batch_key(7, 123), rng.drop_threshold(0.3)
    for start, n in ((0, 1000), (2**32 - 50, 100), (3 * 2**32 + 5, 200)):
        assert torch.equal(rng.hashes_torch(start, n, key, "cpu"), torch.from_numpy(rng.hashes(start, n, key)).long())
        want = rng.drop_mask(start, n, key, thr)
        assert torch.equal(rng.torch_drop_mask(start, n, key, thr, "cpu"), want) and 0 < int(want.sum()) < n


def test_a_mask_for_another_device_is_not_hashed_on_the_host(monkeypatch):
    def host(*a):
        raise AssertionError("hashed with NumPy on the host")

    monkeypatch.setattr(rng, "hashes", host)
    mask = rng.drop_mask(0, 10_000, rng.micro_batch_key(0, 0), rng.drop_threshold(0.1), "meta")
    assert mask.device.type == "meta" and mask.dtype == torch.bool and mask.shape == (10_000,)


def test_drop_rate_and_independence():
    n, thr = 1_000_000, rng.drop_threshold(0.1)
    a = rng.drop_mask(0, n, rng.micro_batch_key(0, 0), thr)
    b = rng.drop_mask(0, n, rng.micro_batch_key(0, 1), thr)
    assert abs(float(a.float().mean()) - 0.1) < 0.002
    assert abs(float((a & b).float().mean()) - 0.01) < 0.0006  # another micro-batch: an independent mask
    assert abs(float((a[1:] & a[:-1]).float().mean()) - 0.01) < 0.0006  # neighbours independent too
    assert torch.equal(a, rng.drop_mask(0, n, rng.micro_batch_key(0, 0), thr))
    assert rng.micro_batch_key(0, 5) != rng.micro_batch_key(1, 5)


# ---- dropout in the layer -------------------------------------------------------------------------------

def test_training_forward_and_gradient_equal_a_dense_masked_reference(tokens):
    model = _model().train()
    set_dropout_key(model, seed=3, micro_batch=5)
    out, grad = _grad(model, tokens)

    # Dense reference: W = W0 + mask ⊙ ΔW / (1 - p) with ΔW a leaf; ∂L/∂θ = Pᵀ ∂L/∂ΔW.
    state, key, thr = state_of(model), rng.micro_batch_key(3, 5), rng.drop_threshold(P)
    dense = copy.deepcopy(model)
    leaves, masks = [], []
    for (name, layer), (_, twin) in zip(gpart_layers(model), gpart_layers(dense)):
        shape = layer.base_layer.weight.shape
        keep = ~rng.drop_mask(layer.groups.offset, layer.groups.n_weight, key, thr).view(shape)
        delta = layer.delta_weight().detach().requires_grad_(True)
        leaves.append(delta)
        masks.append(keep)
        set_module(dense, name, _MaskedDense(twin.base_layer.weight, delta, keep))
    dense_out = dense(tokens).logits
    dense_out.square().mean().backward()
    torch.testing.assert_close(out, dense_out.detach(), rtol=0, atol=2e-6)
    # ∂L/∂ΔW of the dense model is already (mask ⊙ ∂L/∂W) / (1 - p): exactly zero where a weight was dropped.
    assert all(torch.count_nonzero(dw.grad[~k]) == 0 for dw, k in zip(leaves, masks))
    flat = torch.cat([dw.grad.flatten() for dw in leaves]).double()
    n = state.n_params
    ref = torch.zeros(40, dtype=torch.float64).index_add_(0, group_ids(n, 40, 0).long(), flat)
    ref /= group_sizes(n, 40).double().sqrt()
    assert float((grad.double() - ref).norm() / ref.norm()) < 1e-5
    # About p of ΔW is dropped (3,072 weights: the binomial spread is 0.007).
    dropped = torch.cat([(~k).flatten() for k in masks]).float().mean()
    assert abs(float(dropped) - P) < 0.03


def test_eval_and_merge_ignore_dropout(tokens):
    plain, dropped = _model(p=0.0), _model(p=0.5)
    with torch.no_grad():
        assert torch.equal(plain.eval()(tokens).logits, dropped.eval()(tokens).logits)
    merged = [gpart.merge(copy.deepcopy(m)) for m in (plain, dropped)]
    for (name, a), (_, b) in zip(merged[0].named_parameters(), merged[1].named_parameters()):
        assert torch.equal(a, b), name


def test_dropout_changes_training_and_the_key_decides_the_mask(tokens):
    model = _model().train()
    outs = {}
    for index in (0, 0, 1):
        set_dropout_key(model, 0, index)
        outs.setdefault(index, []).append(_grad(model, tokens)[0])
    assert torch.equal(outs[0][0], outs[0][1]) and not torch.equal(outs[0][0], outs[1][0])
    with torch.no_grad():
        assert not torch.equal(outs[0][0], _model(p=0.0).train()(tokens).logits)


@pytest.mark.parametrize("keyed", [True, False])
def test_checkpoint_recompute_sees_the_same_mask(keyed):
    """Non-reentrant checkpointing re-runs the forward in backward: the mask must not change. With a trainer key
    it is the key; without one the key is drawn from torch's RNG, which checkpointing restores."""
    model = _model().train()
    layer = gpart_layers(model)[0][1]
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if keyed:
        set_dropout_key(model, 0, 9)
    grads = []
    for wrap in (lambda f, v: f(v), lambda f, v: checkpoint(f, v, use_reentrant=False)):
        torch.manual_seed(4)
        gpart.theta(model).grad = None
        wrap(layer, x).square().sum().backward()
        grads.append(gpart.theta(model).grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.slow
def test_kernel_path_applies_the_same_mask(tokens, monkeypatch):
    model, tokens = _model().to(DEVICE).train(), tokens.to(DEVICE)
    set_dropout_key(model, 2, 7)
    monkeypatch.setenv("GPART_TRITON", "0")
    ref_out, ref_grad = _grad(model, tokens)
    monkeypatch.setenv("GPART_TRITON", "1")  # the kernels hash the same (index, key) on the fly
    out, grad = _grad(model, tokens)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_dropout_is_validated():
    with pytest.raises(GpartError, match=r"dropout = 1.0 is invalid: it must be a probability in \[0, 1\)"):
        gpart.GPartConfig(d=4, dropout=1.0)
    with pytest.raises(GpartError, match=r"recipe field method.dropout = -0.1 must be in \[0, 1\)"):
        from_dict({"model": {"name_or_path": "x"}, "method": {"dropout": -0.1}})


@pytest.mark.slow
def test_dropout_run_resumes_to_the_same_theta(tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__eval_before=False, method__dropout=0.1)
    run(recipe, tmp_path / "whole")
    keyed = []

    def stop_in_step_7(model, seed, micro_batch):  # Ctrl-C as step 7 keys its dropout (batch 1 per step)
        if micro_batch == 6 and not keyed:
            keyed.append(micro_batch)
            os.kill(os.getpid(), signal.SIGINT)
        set_dropout_key(model, seed, micro_batch)

    with monkeypatch.context() as patch:
        patch.setattr("gpart_cli.train.trainer.set_dropout_key", stop_in_step_7)
        with pytest.raises(KeyboardInterrupt):
            run(recipe, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last" / "state.json").read_text())["step"] == 7
    run(recipe, tmp_path / "cut", resume=True)
    whole, cut = (gpart.read_artifact(tmp_path / d / "adapter.gpart") for d in ("whole", "cut"))
    assert torch.equal(whole.theta, cut.theta)
    assert whole.meta["dropout"] == 0.1 and whole.meta["recipe"]["method"]["dropout"] == 0.1
    run(glue_recipe(tiny_bert_dir, sst2_files, train__eval_before=False), tmp_path / "plain")
    assert not torch.equal(whole.theta, gpart.read_artifact(tmp_path / "plain" / "adapter.gpart").theta)


# ---- init_bound ---------------------------------------------------------------------------------------------

def test_init_bound_zero_gives_exact_zeros():
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=40, target_modules=TARGETS, init_bound=0.0))
    assert torch.equal(gpart.theta(model), torch.zeros(40))


def test_init_bound_is_respected_seeded_and_uniform():
    def theta(**kw):
        cfg = gpart.GPartConfig(d=4000, target_modules=TARGETS, init_bound=0.01, **kw)
        return gpart.theta(gpart.apply(tiny_llama(layers=8), cfg)).detach()

    a = theta(seed=0)
    assert a.dtype == torch.float32 and float(a.abs().max()) <= 0.01 and float(a.abs().min()) > 0
    assert float(a.min()) < -0.0099 and float(a.max()) > 0.0099
    assert abs(float(a.mean())) < 0.0005 and abs(float(a.std()) - 0.01 / 3**0.5) < 0.0003  # U(-b, b)
    expected = (2 * rng.uniform(4000, rng.init_key(0)) - 1) * 0.01  # the definition, exactly
    assert torch.equal(a, expected.float())
    assert torch.equal(a, theta(seed=0)) and torch.equal(a, theta(seed=5, init_seed=0))
    assert not torch.equal(a, theta(seed=0, init_seed=1))
    with pytest.raises(GpartError, match="init_bound = -1 is invalid"):
        gpart.GPartConfig(d=4, init_bound=-1)


def test_recipe_knobs_reach_the_model_and_the_artifact(tmp_path):
    method = MethodSection(name="gpart", d=40, target_modules=TARGETS, dropout=0.05, init_bound=0.02)
    prepared = prepare(tiny_llama(), method, TrainSection(seed=3), "causal_lm")
    state = state_of(prepared.model)
    assert (state.config.dropout, state.config.init_bound, state.config.init_seed) == (0.05, 0.02, 3)
    expected = (2 * rng.uniform(40, rng.init_key(3)) - 1) * 0.02  # seeded by the train seed
    assert torch.equal(state.theta.detach(), expected.float())
    path = gpart.save(prepared.model, tmp_path / "a.gpart")
    meta = gpart.read_artifact(path).meta
    assert (meta["dropout"], meta["init_bound"], meta["init_seed"]) == (0.05, 0.02, 3)
    loaded = gpart.load(tiny_llama(), path)
    assert state_of(loaded).config.dropout == 0.05
    summary = json.loads(CliRunner().invoke(app, ["inspect", str(path), "--json"]).output)
    assert (summary["dropout"], summary["init_bound"]) == (0.05, 0.02)


def test_shipped_paper_recipes_carry_the_authors_dropout():
    from tests.recipe.test_shipped_recipes import RECIPES

    for path in sorted(RECIPES.glob("glue-*.yaml")):
        recipe = load_recipe(path)  # GPart's recipes; a baseline's (glue-sst2-vera-*) has no ΔW to drop
        assert recipe.method.dropout == (0.1 if recipe.method.name == "gpart" else 0.0), path.name
    for path in sorted(RECIPES.glob("metamath-*.yaml")):
        assert load_recipe(path).method.dropout == 0.05, path.name
    assert load_recipe(RECIPES / "quickstart-sst2-minilm.yaml").method.dropout == 0.0
    assert np.isclose(load_recipe(RECIPES / "glue-rte-roberta-base.yaml").method.init_bound, 0.0)
