"""One ∂L/∂θ buffer per backward pass (docs/design.md §3.1): every layer adds into it, the θ_s node scales it once.

The reference is Pᵀ of the dense gradient (fp64): P built from the partition's definition (`core/reference.py`
over feistel-v1 with the base model's target sizes), w = w0 + Pθ put into the untouched base model, ∂L/∂w by
autograd.
"""

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.core import reference
from gpart_cli.core.model import state_of
from gpart_cli.kernels import theta_grad
from gpart_cli.partition import FEISTEL, Partition
from tests.conftest import tiny_llama

D = 48
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _model(dropout=0.0):
    model = gpart.apply(tiny_llama(), gpart.GPartConfig(d=D, target_modules=TARGETS, dropout=dropout))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(D, generator=torch.Generator().manual_seed(4)) * 0.1)
    return model


def _tokens(seed):
    return torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(seed))


def _loss(model, tokens):
    return model(tokens).logits.square().mean()


def _dense_reference(theta, tokens) -> torch.Tensor:
    """Pᵀ ∂L/∂w at w = w0 + Pθ, in fp64: P from the partition's definition (feistel-v1, seed 0, over the targets'
    sizes in the base model, module order), ∂L/∂w by autograd on the base model."""
    base = tiny_llama().double()
    names = [name for name, _ in base.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    w0 = [base.get_submodule(name).weight for name in names]
    sizes = [w.numel() for w in w0]
    p = reference.dense_p(Partition(FEISTEL, sum(sizes), D, 0, sizes))  # [N, d], PᵀP = I
    w = (torch.cat([t.detach().flatten() for t in w0]) + p @ theta.detach().double()).requires_grad_()
    weights = {f"{name}.weight": piece.view_as(t) for name, piece, t in zip(names, w.split(sizes), w0)}
    torch.func.functional_call(base, weights, (tokens,)).logits.square().mean().backward()
    return p.t() @ w.grad


def test_the_step_gradient_is_p_transpose_of_the_dense_gradient():
    """∂L/∂θ of a training step equals Pᵀ ∂L/∂w of the same loss at the same weights, P from the definition."""
    model, tokens = _model(), _tokens(0)
    _loss(model, tokens).backward()
    torch.testing.assert_close(gpart.theta(model).grad.double(), _dense_reference(gpart.theta(model), tokens),
                               rtol=1e-5, atol=1e-8)


def test_every_layer_of_a_pass_adds_into_one_sink_and_returns_no_gradient_of_its_own(monkeypatch):
    model = _model()
    rows_asked, taken = [], []
    real_rows, real_take = theta_grad.GradSink.rows, theta_grad.GradSink.take
    monkeypatch.setattr(theta_grad.GradSink, "rows", lambda self: rows_asked.append(id(self)) or real_rows(self))
    monkeypatch.setattr(theta_grad.GradSink, "take", lambda self: taken.append(id(self)) or real_take(self))
    _loss(model, _tokens(0)).backward()
    assert len(rows_asked) == 8 and len(set(rows_asked)) == 1  # 2 blocks x q/k/v/o, one sink
    assert taken == rows_asked[:1]  # taken once, after the last layer


def test_a_pass_that_stops_before_theta_leaves_nothing_for_the_next():
    """torch.autograd.grad with respect to the inputs only reaches every layer but not θ's node."""
    model, tokens = _model(), _tokens(1)
    _loss(model, tokens).backward()
    alone = gpart.theta(model).grad.clone()
    model.zero_grad()
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_()
    loss = model(inputs_embeds=embeds).logits.square().mean()
    (grad_embeds,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    assert grad_embeds.abs().sum() > 0 and gpart.theta(model).grad is None
    loss.backward()  # the same graph again, now down to θ: the first pass's sums are not added twice
    torch.testing.assert_close(gpart.theta(model).grad, alone, rtol=1e-6, atol=1e-9)


def test_micro_batches_accumulate_and_one_backward_of_two_forwards_adds_both():
    model = _model()
    grads = []
    for seed in (2, 3):
        model.zero_grad()
        _loss(model, _tokens(seed)).backward()
        grads.append(gpart.theta(model).grad.clone())
    model.zero_grad()
    for seed in (2, 3):  # gradient accumulation: one backward per micro-batch
        _loss(model, _tokens(seed)).backward()
    torch.testing.assert_close(gpart.theta(model).grad, grads[0] + grads[1], rtol=1e-6, atol=1e-9)
    model.zero_grad()
    (_loss(model, _tokens(2)) + _loss(model, _tokens(3))).backward()  # two forwards, one pass
    torch.testing.assert_close(gpart.theta(model).grad, grads[0] + grads[1], rtol=1e-6, atol=1e-9)


def test_autograd_grad_with_respect_to_theta_returns_it_without_touching_dot_grad():
    model, tokens = _model(), _tokens(4)
    _loss(model, tokens).backward()
    want = gpart.theta(model).grad.clone()
    model.zero_grad()
    (got,) = torch.autograd.grad(_loss(model, tokens), gpart.theta(model))
    assert torch.equal(got, want) and gpart.theta(model).grad is None


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradient(reentrant):
    model, tokens = _model(), _tokens(5)
    _loss(model, tokens).backward()
    plain = gpart.theta(model).grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    _loss(model, tokens).backward()
    torch.testing.assert_close(gpart.theta(model).grad, plain, rtol=1e-6, atol=1e-9)


def test_dropout_scales_the_sink_once_by_one_over_one_minus_p():
    """With every mask forced to keep all weights, p = 0.5 doubles θ_s and so doubles ∂L/∂θ's chain rule."""
    model, tokens = _model(dropout=0.5), _tokens(6)
    state = state_of(model)
    state.dropout = lambda training: (0, 0) if training else None  # threshold 0: nothing dropped
    _loss(model.eval(), tokens).backward()  # eval: no dropout, no factor
    plain = gpart.theta(model).grad.clone()
    with torch.no_grad():
        gpart.theta(model).mul_(0.5)  # train mode doubles θ_s: the same forward as eval with θ
    model.zero_grad()
    _loss(model.train(), tokens).backward()
    torch.testing.assert_close(gpart.theta(model).grad, 2 * plain, rtol=1e-5, atol=1e-9)


def test_theta_s_used_outside_the_layers_gets_its_own_chain_rule():
    model, tokens = _model(), _tokens(7)
    state = state_of(model)
    _loss(model, tokens).backward()
    layers_only = gpart.theta(model).grad.clone()
    model.zero_grad()
    loss = _loss(model, tokens)
    theta_s, _ = state.layer_theta(torch.device("cpu"), training=True)  # the shared node of this forward
    (loss + theta_s.sum()).backward()  # ∂(Σ θ_s)/∂θ = 1/√n
    torch.testing.assert_close(gpart.theta(model).grad, layers_only + state.inv_sqrt_sizes, rtol=1e-6, atol=1e-9)
