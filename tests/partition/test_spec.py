"""A partition's identity: one frozen PartitionSpec whose `diff` names exactly the fields that change P, and the same
spec read from a model's GPart state, a .gpart file and a merged model's record."""

import copy
import dataclasses

import pytest
import torch

import gpart_cli as gpart
from gpart_cli.core.model import MERGED, state_of
from gpart_cli.errors import GpartError
from gpart_cli.partition.spec import PartitionSpec, Target
from gpart_cli.recipe.methods import _start_from
from tests.conftest import tiny_llama

RECORD = {"partition": "feistel-v1", "n_params": 3072, "d": 64, "seed": 3, "isometric": True,
          "targets": [{"name": "a.q", "shape": [32, 32], "bias": False}, {"name": "a.v", "shape": [16, 64], "bias": True}]}


def test_from_record_reads_the_artifact_metadata_names():
    spec = PartitionSpec.from_record(RECORD)
    assert spec == PartitionSpec("feistel-v1", 3072, 64, 3, True,
                                 (Target("a.q", (32, 32), False), Target("a.v", (16, 64), True)))
    assert [t.record() for t in spec.targets] == RECORD["targets"]
    assert hash(spec) == hash(PartitionSpec.from_record(copy.deepcopy(RECORD)))  # frozen: usable as a key


@pytest.mark.parametrize("field, value, text", [("algorithm", "splitmix64-mod-v1",
                                                 "algorithm 'feistel-v1' vs 'splitmix64-mod-v1'"),
                                                ("n_params", 4096, "n_params 3072 vs 4096"), ("d", 128, "d 64 vs 128"),
                                                ("seed", 4, "seed 3 vs 4"), ("isometric", False,
                                                                              "isometric True vs False")])
def test_diff_names_the_one_field_that_differs(field, value, text):
    ours = PartitionSpec.from_record(RECORD)
    theirs = dataclasses.replace(ours, **{field: value})
    assert [str(d) for d in ours.diff(theirs)] == [text]
    assert ours.diff(ours) == []


def test_diff_of_targets_names_modules_shapes_bias_and_order():
    ours = PartitionSpec.from_record(RECORD)
    q, v = ours.targets
    grown = dataclasses.replace(ours, targets=(Target("a.q", (64, 64), False), v))
    assert [str(d) for d in ours.diff(grown, "adapter", "model")] == [
        "targets differ (a.q: adapter [32, 32] bias=False, model [64, 64] bias=False)"]
    other = dataclasses.replace(ours, targets=(q, Target("a.k", (16, 64), True)))
    assert ours.diff(other)[0].detail == "only in ours: a.v; only in theirs: a.k"
    swapped = dataclasses.replace(ours, targets=(v, q))
    assert ours.diff(swapped)[0].detail == "same modules in a different order"


def _applied(seed=0, d=32):
    return gpart.apply(tiny_llama(), gpart.GPartConfig(d=d, seed=seed, target_modules=["q_proj", "v_proj"]))


def test_state_artifact_and_merge_record_agree(tmp_path):
    model = _applied(seed=5)
    spec = state_of(model).spec
    # tiny_llama: 2 layers of q (32x32) and v (16x32): N = 2 * (1024 + 512)
    assert (spec.algorithm, spec.n_params, spec.d, spec.seed, spec.isometric) == ("feistel-v1", 3072, 32, 5, True)
    assert [t.name for t in spec.targets] == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    assert gpart.read_artifact(gpart.save(model, tmp_path / "a.gpart")).spec == spec
    merged = gpart.merge(model)
    assert getattr(merged, MERGED)["spec"] == spec


def test_swap_and_init_from_refuse_another_partition_naming_the_field(tmp_path):
    trained = _applied(seed=6)
    with torch.no_grad():
        gpart.theta(trained).copy_(torch.linspace(-1, 1, 32))
    other = gpart.read_artifact(gpart.save(trained, tmp_path / "b.gpart"))
    with pytest.raises(GpartError, match=r"partition differs \(seed 5 vs 6\)"):
        gpart.swap(_applied(seed=5), other)
    with pytest.raises(GpartError, match=r"trained with method.seed = 6 but the recipe has method.seed = 5; "
                                         r"set --set method.seed=6"):
        _start_from(_applied(seed=5), other)
    wider = gpart.apply(tiny_llama(), gpart.GPartConfig(d=32, seed=6, target_modules=["q_proj"]))
    with pytest.raises(GpartError, match=r"adapts other modules .*only in the adapter: model.layers.0.self_attn.v_proj"):
        _start_from(wider, other)
    same = _applied(seed=6)
    _start_from(same, other)
    assert torch.equal(state_of(same).theta, torch.linspace(-1, 1, 32))
