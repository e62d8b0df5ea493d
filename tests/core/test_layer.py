"""GPart layer and injection properties (docs/design.md §1, §3) on tiny Llama, RoBERTa, ViT and GPT-2 models.

The oracle is `gpart_cli.core.reference`: ΔW = (θ · scale)[g] from the partition's definition, and ∂L/∂θ by
autograd through it, on the untouched base model.
"""

import copy
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gpart_cli as gpart
import gpart_cli.core.layer as layer_module
from gpart_cli.core import reference
from gpart_cli.core.layer import GPartLinear
from gpart_cli.core.model import gpart_layers, state_of
from gpart_cli.errors import GpartError
from gpart_cli.kernels import cpu_native
from gpart_cli.kernels.delta_ops import LayerGroups, combine_rows, sink_rows
from gpart_cli.partition import FEISTEL, Partition
from tests.conftest import tiny_gpt2, tiny_llama, tiny_roberta, tiny_vit


def _inputs(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 90, (2, 9), generator=g)}


def _out(model, inputs):
    return model(**inputs).logits


MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "roberta": (tiny_roberta, ["query", "value"]),
    "vit": (tiny_vit, ["query", "value", "q_proj", "v_proj"]),  # transformers 5 renamed ViT q/v
    "gpt2": (tiny_gpt2, ["c_attn"]),
}


def _adapted(kind, d=64, **kw):
    make, targets = MODELS[kind]
    base = make()
    return base, gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=d, target_modules=targets, **kw))


def _delta(model):
    """All ΔW of the model concatenated in module-spec order (fp32)."""
    return torch.cat([layer.delta_weight().flatten() for _, layer in gpart_layers(model)])


def _targets(model) -> list[str]:
    return [name for name, _ in gpart_layers(model)]


def _partition(base, targets, d, seed=0, bias=False) -> Partition:
    """feistel-v1 over the targets' sizes as the base model has them (weight, then bias with `bias`)."""
    modules = [base.get_submodule(name) for name in targets]
    sizes = [m.weight.numel() + (m.bias.numel() if bias and m.bias is not None else 0) for m in modules]
    return Partition(FEISTEL, sum(sizes), d, seed, sizes)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_theta_zero_gives_the_base_model_bitwise(kind):
    base, model = _adapted(kind)
    inputs = _inputs(kind)
    theta = gpart.theta(model)
    assert theta.dtype == torch.float32 and theta.shape == (64,) and torch.count_nonzero(theta) == 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["gpart_state.theta"]
    with torch.no_grad():
        assert torch.equal(_out(model, inputs), _out(base, inputs))
    model.train(), base.train()
    torch.manual_seed(0)
    a = _out(model, inputs)
    torch.manual_seed(0)
    assert torch.equal(a, _out(base, inputs))  # the autograd Function path too


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_unit_vectors_give_disjoint_supports_of_the_right_size(kind):
    """θ = e_j moves exactly group j's n_j weights, each by 1/√n_j, the groups disjoint: the reference's ΔW bit for
    bit."""
    base, model = _adapted(kind, d=50)
    state = state_of(model)
    partition = _partition(base, _targets(model), 50)
    sizes = torch.bincount(reference.group_of(partition), minlength=50)
    seen = torch.zeros(state.n_params, dtype=torch.bool)
    for j in (0, 7, 49):
        with torch.no_grad():
            state.theta.zero_()
            state.theta[j] = 1.0
        delta = _delta(model)
        nz = delta != 0
        assert int(nz.sum()) == int(sizes[j])
        assert torch.equal(delta[nz], torch.full((int(sizes[j]),), float(sizes[j]) ** -0.5))
        assert torch.equal(delta, reference.delta(state.theta.detach(), partition))
        assert not (seen & nz).any()
        seen |= nz


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_isometry_and_untouched_weights(kind):
    """ΔW = Pθ with the reference's dense P, PᵀP = I so ‖ΔW‖ = ‖θ‖, and merging changes no weight outside the
    targets."""
    base, model = _adapted(kind, d=40)
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(40, generator=torch.Generator().manual_seed(0)))
    delta = _delta(model)
    p = reference.dense_p(_partition(base, _targets(model), 40))
    torch.testing.assert_close(p.t() @ p, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(delta.double(), p @ gpart.theta(model).double(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(delta.double().norm(), gpart.theta(model).double().norm(), rtol=1e-6)
    merged = gpart.merge(copy.deepcopy(model))
    adapted = {n for n, _ in gpart_layers(model)}
    for (name, p), (_, p0) in zip(merged.named_parameters(), base.named_parameters()):
        if name.rsplit(".", 1)[0] not in adapted:
            assert torch.equal(p, p0), name


def test_non_isometric_ablation_drops_the_scale():
    """isometric: false gives ΔW = θ[g], the reference without its scale; the isometric layer keeps 1/√n_j."""
    base, iso = _adapted("llama", d=30)
    _, raw = _adapted("llama", d=30, isometric=False)
    theta = torch.randn(30, generator=torch.Generator().manual_seed(1))
    for m in (iso, raw):
        with torch.no_grad():
            gpart.theta(m).copy_(theta)
    n = state_of(raw).n_params
    partition = _partition(base, _targets(iso), 30)
    assert torch.equal(_delta(raw), reference.delta(theta, partition, isometric=False))
    assert torch.equal(_delta(iso), reference.delta(theta, partition))
    # Without the scale ‖ΔW‖² = Σ n_j θ_j², about N/d times ‖θ‖²: the isometry is lost.
    ratio = float(_delta(raw).detach().norm() ** 2 / theta.norm() ** 2)
    assert abs(ratio - n / 30) / (n / 30) < 0.01


@pytest.mark.parametrize("bias", [False, True], ids=["weights", "weights_and_biases"])
@pytest.mark.parametrize("isometric", [True, False], ids=["isometric", "non_isometric"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gradient_is_autograd_through_the_reference(kind, isometric, bias):
    """The layer's custom backward gives the ∂L/∂θ that autograd gives through the reference (the base model in
    fp64, each target's w0 + (θ · scale)[g]): Pᵀ ∂L/∂w with scale 1/√n_j, or 1 in the non-isometric ablation."""
    base, model = _adapted(kind, d=64, isometric=isometric, bias=bias)
    theta = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        gpart.theta(model).copy_(theta)
    inputs = _inputs(kind)
    # eval(): no dropout, so both passes see the same function; grad mode still takes the Function path.
    _out(model, inputs).square().mean().backward()
    grad = gpart.theta(model).grad.double()

    targets = _targets(model)
    theta64 = theta.double().requires_grad_()
    dense = copy.deepcopy(base).double()
    out = reference.forward(dense, theta64, _partition(base, targets, 64, bias=bias), targets, bias, isometric,
                            **{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    out.logits.square().mean().backward()
    assert float((grad - theta64.grad).norm() / theta64.grad.norm()) < 1e-5


def test_bias_adaptation_covers_biases_and_their_gradient():
    base, model = _adapted("roberta", d=64, bias=True)
    state = state_of(model)
    assert all(t["bias"] for t in state.targets)
    assert state.n_params == sum(t["shape"][0] * t["shape"][1] + t["shape"][0] for t in state.targets)
    with torch.no_grad():
        state.theta.copy_(torch.randn(64, generator=torch.Generator().manual_seed(5)))
    merged = gpart.merge(copy.deepcopy(model))
    name = state.targets[0]["name"]
    assert not torch.equal(merged.get_submodule(name).bias, base.get_submodule(name).bias)
    model.train()
    _out(model, _inputs("roberta")).sum().backward()
    assert torch.count_nonzero(state.theta.grad) == 64


def test_bf16_base_keeps_theta_fp32():
    base, model = _adapted("llama", d=32)
    with torch.no_grad():
        gpart.theta(model).fill_(1e-3 + 1e-9)  # not representable in bf16: must survive the cast exactly
    model = model.to(torch.bfloat16).train()
    state = state_of(model)
    assert state.theta.dtype == torch.float32 and state.inv_sqrt_sizes.dtype == torch.float32
    assert float(state.theta[0]) == torch.tensor(1e-3 + 1e-9, dtype=torch.float32).item()
    with torch.no_grad():
        state.theta.zero_()
    logits = _out(model, _inputs("llama"))
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    assert state.theta.grad.dtype == torch.float32 and torch.count_nonzero(state.theta.grad) > 0
    with torch.no_grad():
        assert torch.equal(_out(model.eval(), _inputs("llama")), _out(base.to(torch.bfloat16), _inputs("llama")))


def test_gradient_checkpointing_non_reentrant_gives_the_same_gradient():
    _, model = _adapted("llama", d=16)
    layer = gpart_layers(model)[0][1]
    x = torch.randn(3, 5, 32, requires_grad=True)
    with torch.no_grad():
        gpart.theta(model).normal_()
    layer(x).square().sum().backward()
    plain = gpart.theta(model).grad.clone()
    gpart.theta(model).grad = None
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(gpart.theta(model).grad, plain)


def test_inference_follows_theta():
    _, model = _adapted("llama", d=16)
    inputs = _inputs("llama")
    with torch.no_grad():
        first = _out(model, inputs)
        gpart.theta(model).add_(1.0)  # an in-place update, as an optimizer step does
        second = _out(model, inputs)
    assert not torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(second, _out(gpart.merge(copy.deepcopy(model)), inputs))


def test_eval_holds_one_extra_weight_copy_at_a_time(monkeypatch):
    """Unmerged inference builds each W_eff for its own call and drops it: never a second copy of the model."""
    _, model = _adapted("llama", d=16)
    with torch.no_grad():
        gpart.theta(model).normal_()
    built, alive_at_build = [], []
    real = LayerGroups.build

    def tracked(self, *args, **kwargs):
        alive_at_build.append(sum(ref() is not None for ref in built))
        out = real(self, *args, **kwargs)
        built.append(weakref.ref(out))
        return out

    monkeypatch.setattr(LayerGroups, "build", tracked)
    with torch.no_grad():
        _out(model.eval(), _inputs("llama"))
    assert len(built) == 8 and alive_at_build == [0] * 8
    assert not any(hasattr(layer, "_cache") for _, layer in gpart_layers(model))


def test_merge_frees_the_id_caches_layer_by_layer(monkeypatch):
    _, model = _adapted("llama", d=16)
    model.train()
    _out(model, _inputs("llama")).sum().backward()  # the CPU path caches every layer's ids (4 B/param)
    layers = [layer for _, layer in gpart_layers(model)]
    assert all(layer.groups.state_bytes() > 0 for layer in layers)
    cached_at_merge = []
    real = GPartLinear.merged_weights

    def tracked(self):
        cached_at_merge.append(sum(layer.groups.state_bytes() > 0 for layer in layers))
        return real(self)

    monkeypatch.setattr(GPartLinear, "merged_weights", tracked)
    gpart.merge(model)
    assert cached_at_merge == list(range(8, 0, -1)) and all(layer.groups.state_bytes() == 0 for layer in layers)


def test_a_model_forward_reads_the_compute_switches_once(monkeypatch):
    """GPART_TRITON is read as the model's forward starts and holds for all its layers and its backward; the next
    forward, and a layer called on its own, read the environment again, also after a forward that raised."""
    _, model = _adapted("llama", d=16)
    log, layers = state_of(model).compute, [layer for _, layer in gpart_layers(model)]
    cpu = f"CPU, {cpu_native.describe()}"  # the reason the CPU runs the reference path in auto mode
    monkeypatch.delenv("GPART_TRITON", raising=False)
    layers[0].register_forward_pre_hook(lambda *args: monkeypatch.setenv("GPART_TRITON", "0"))
    _out(model, _inputs("llama")).sum().backward()  # switched to 0 after the model's forward began
    assert len(log.entries) == 2 and set(log.entries.values()) == {cpu}  # build and grad of all 8 layers
    log.entries.clear()
    _out(model, _inputs("llama")).sum().backward()
    assert len(log.entries) == 2 and set(log.entries.values()) == {"GPART_TRITON=0"}
    log.entries.clear()
    monkeypatch.delenv("GPART_TRITON")
    layers[1](torch.randn(2, 32)).sum().backward()
    assert set(log.entries.values()) == {cpu}
    layers[1].register_forward_pre_hook(lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _out(model, _inputs("llama"))
    log.entries.clear()
    monkeypatch.setenv("GPART_TRITON", "0")
    layers[2](torch.randn(2, 32)).sum().backward()
    assert set(log.entries.values()) == {"GPART_TRITON=0"}


def test_head_modules_train_with_theta():
    _, model = _adapted("roberta", head_modules=["classifier"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                         "classifier.out_proj.bias", "gpart_state.theta"]
    assert state_of(model).head_names == trainable[:4]


def test_no_matching_module_lists_what_exists():
    with pytest.raises(GpartError, match=r"no module matches.*q_proj.*Set target_modules") as e:
        gpart.apply(tiny_roberta(), gpart.GPartConfig(d=4, target_modules=["q_proj"]))
    assert "query" in str(e.value) and "value" in str(e.value)


def test_regex_and_suffix_targets():
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=4, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert [t["name"] for t in state_of(model).targets] == ["model.layers.1.self_attn.q_proj",
                                                            "model.layers.1.self_attn.v_proj"]
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=4, target_modules=["self_attn.o_proj"]))
    assert len(state_of(model).targets) == 2


@pytest.mark.parametrize("d", [0, -3])
def test_d_below_one_is_rejected(d):
    with pytest.raises(GpartError, match=f"d = {d} is out of range: d must be an integer with 1 <= d <= N"):
        gpart.GPartConfig(d=d)


def test_d_above_n_is_rejected():
    with pytest.raises(GpartError, match=r"d = 9,999 is out of range.*N = 2,048"):
        gpart.apply(tiny_llama(), gpart.GPartConfig(d=9999, target_modules=["q_proj"]))


def test_unsupported_module_type_is_rejected():
    with pytest.raises(GpartError, match="Embedding.*nn.Linear"):
        gpart.apply(tiny_llama(), gpart.GPartConfig(d=4, target_modules=["embed_tokens"]))


def test_applying_twice_is_rejected():
    _, model = _adapted("llama")
    with pytest.raises(GpartError, match="already has GPart"):
        gpart.apply(model, gpart.GPartConfig(d=4, target_modules=["q_proj"]))


@pytest.mark.parametrize("d, id_dtype", [(65_536, torch.uint16), (65_537, torch.int32)])
@pytest.mark.parametrize("out_features", [300, 301])  # 300 x 201 weights split into rows; 301 x 201 is odd
def test_cpu_id_cache_is_uint16_up_to_65536_groups_and_changes_no_bits(d, id_dtype, out_features):
    n, offset, shape = 70_000, 1_000, (out_features, 201)
    n_weight, n_bias = shape[0] * shape[1], shape[0]
    partition = Partition(FEISTEL, n, d, 7)
    groups = LayerGroups(partition, offset, n_weight, n_bias)
    ids = reference.group_of(partition)[offset:offset + n_weight + n_bias]
    assert groups.ids(torch.device("cpu")).dtype == id_dtype
    assert groups.state_bytes() == (n_weight + n_bias) * (2 if id_dtype == torch.uint16 else 4)
    assert int(ids.max()) > 32_767  # ids past int16's range survive the uint16 cache

    g = torch.Generator().manual_seed(1)
    theta_s, weight, bias = torch.randn(d, generator=g), torch.randn(shape, generator=g), torch.randn(shape[0])
    gy, x = torch.randn(16, shape[0], generator=g), torch.randn(16, shape[1], generator=g)
    built = groups.build(weight, theta_s)
    delta = reference.delta(theta_s, partition, isometric=False)[offset:offset + n_weight + n_bias]  # θ_s: scaled
    assert torch.equal(built, weight + delta[:n_weight].view(shape))
    assert torch.equal(groups.effective_bias(bias, theta_s), bias + delta[n_weight:])
    grad = _layer_grad(groups, gy, x)
    # the grouped sum is ∂/∂θ_s of Σ (∂L/∂W, ∂L/∂b) ⊙ ΔW: by autograd through the reference, in fp64
    theta64 = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    delta64 = reference.delta(theta64, partition, isometric=False)[offset:offset + n_weight + n_bias]
    (delta64 * torch.cat([(gy.t() @ x).flatten(), gy.sum(0)]).double()).sum().backward()
    assert torch.allclose(grad.double(), theta64.grad, rtol=1e-5, atol=1e-5)

    int32 = LayerGroups(partition, offset, n_weight, n_bias)
    int32._ids = ids.int()  # the int32 cache every version before kept: same bits
    assert torch.equal(int32.build(weight, theta_s), built)
    grad32 = _layer_grad(int32, gy, x)
    assert torch.equal(grad32, grad)


def _layer_grad(groups, gy, x):
    """One layer's grouped sums of ∂L/∂W and ∂L/∂b, unscaled, as a step's sink adds them (docs/design.md §3.1)."""
    rows = torch.zeros(sink_rows(gy.device), groups.d)
    groups.add_weight_grad(rows, gy, x, False)
    groups.add_bias_grad(rows[0], gy.sum(0))
    return combine_rows(rows)


def _saved_for_backward(model) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every tensor a training forward of `model` saves for backward, and the loss to call backward on."""
    model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = _out(model, _inputs("llama")).sum()
    return saved, loss


def test_every_layer_shares_one_scaled_theta_per_step():
    _, model = _adapted("llama", d=64)
    saved, loss = _saved_for_backward(model)
    thetas = {t.data_ptr() for t in saved if t.shape == (64,)}
    assert len(gpart_layers(model)) == 8 and len(thetas) == 1  # one d-sized copy saved, not one per layer
    loss.backward()


def _w_shaped(model, saved):
    """The saved tensors shaped like an adapted weight that are not a weight of the model itself."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(layer.base_layer.weight.shape) for _, layer in gpart_layers(model)}
    w_shaped = [t for t in saved if tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes]
    assert w_shaped  # the frozen weights, at least
    return [t for t in w_shaped if t.data_ptr() not in params]


def test_backward_rebuilds_w_eff_off_the_cpu_so_nothing_of_the_size_of_a_weight_is_saved(monkeypatch):
    """The GPU policy (docs/design.md §3.1): a W-shaped saved tensor may only be a frozen weight of the model."""
    _, model = _adapted("llama", d=64)
    _out(model, _inputs("llama")).sum().backward()
    kept = gpart.theta(model).grad.clone()
    monkeypatch.setattr(layer_module, "_keeps_w_eff", lambda w: False)
    model.zero_grad()
    saved, loss = _saved_for_backward(model)
    assert _w_shaped(model, saved) == []
    loss.backward()
    assert torch.equal(gpart.theta(model).grad, kept) and kept.abs().sum() > 0  # rebuilt or kept: the same bits


def test_on_the_cpu_backward_reuses_the_w_eff_forward_built():
    _, model = _adapted("llama", d=64)
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(64, generator=torch.Generator().manual_seed(2)))
    saved, loss = _saved_for_backward(model)
    extra = _w_shaped(model, saved)
    # one W_eff per adapted layer whose input needs ∂L/∂x: block 0's o_proj (its input depends on θ through q, k,
    # v) and block 1's four; block 0's q, k, v read the frozen embedding and keep none
    layers = [layer for _, layer in gpart_layers(model)]
    assert len(layers) == 8 and len(extra) == 5
    merged = [layer.merged_weights()[0] for layer in layers[3:]]
    assert all(any(torch.equal(t, w) for t in extra) for w in merged)
    loss.backward()


def test_shared_scaled_theta_follows_every_way_theta_changes():
    base, model = _adapted("llama", d=64)
    inputs, theta = _inputs("llama"), gpart.theta(model)
    fresh = lambda: _out(gpart.merge(copy.deepcopy(model)), inputs)  # noqa: E731 (no cache involved)
    optimizer = torch.optim.SGD([theta], lr=0.5)
    _out(model, inputs).square().mean().backward()
    optimizer.step()  # in place: theta's version counter moves
    assert torch.equal(_out(model, inputs), fresh())
    theta.data.copy_(torch.randn(64, generator=torch.Generator().manual_seed(9)))  # bypasses the version counter
    assert torch.equal(_out(model, inputs), fresh())  # the forward pre-hook recomputes it

    layer = gpart_layers(model)[0][1]
    x = torch.randn(3, layer.base_layer.in_features)
    with torch.no_grad():
        theta.add_(1.0)
        direct = layer(x)  # a layer called on its own, no model forward: the version key catches the change
    expected = x @ (layer.base_layer.weight + layer.delta_weight()).t()
    assert torch.allclose(direct, expected, atol=1e-6)

    twin = copy.deepcopy(model)
    with torch.no_grad():
        gpart.theta(twin).zero_()
    assert torch.equal(_out(twin, inputs), _out(base, inputs)) and not torch.equal(_out(model, inputs), _out(base, inputs))
    merged = gpart.merge(model)
    assert len(merged._forward_pre_hooks) == len(merged._forward_hooks) == 0
