"""One place per concept: the method registry and the GPart config fields are defined once, and every place that
needs them reads them from there."""

import copy
import dataclasses

import pytest

import gpart_cli as gpart
from gpart_cli.adapters.inspection import summarize
from gpart_cli.core import config
from gpart_cli.core.model import state_of
from gpart_cli.errors import GpartError
from gpart_cli.recipe import methods
from gpart_cli.recipe import schema as recipe
from gpart_cli.train import sweep
from gpart_cli.train.fsdp import _check
from tests.conftest import tiny_llama


def test_the_registry_is_what_the_recipe_sweep_and_fsdp_accept():
    assert recipe.METHODS == tuple(methods.METHODS) == ("gpart", "unilora", "lora", "full", "linear_probe", "vera")
    assert sweep.D_METHODS == ("gpart", "unilora")
    keys = sweep.plan(["gpart", "vera"], [8, 16], [0])
    assert [(k.method, k.d) for k in keys] == [("gpart", 8), ("gpart", 16), ("vera", None)]
    for name, entry in methods.METHODS.items():
        assert entry.result in methods.RESULTS
        if not entry.fsdp:
            with pytest.raises(GpartError, match=f"fsdp does not support method '{name}'"):
                _check(None, name, [])


def test_recipe_method_defaults_are_gpart_configs():
    section = {f.name: f.default for f in dataclasses.fields(recipe.MethodSection)}
    for name in config.FROM_RECIPE:
        if name != "d":  # GPartConfig has no default d; a recipe's is 23,040
            assert section[name] == config.default(name), name
    built = config.GPartConfig.from_fields(recipe.MethodSection(d=8, dropout=0.1), target_modules=("q_proj",))
    assert (built.d, built.dropout, built.seed, built.isometric) == (8, 0.1, 0, True)


def test_stored_fields_round_trip_and_are_shown(tmp_path):
    model = gpart.apply(copy.deepcopy(tiny_llama()), gpart.GPartConfig(d=16, seed=5, isometric=False, dropout=0.2,
                                                                     init_bound=0.01, target_modules=["q_proj"]))
    art = gpart.read_artifact(gpart.save(model, tmp_path / "a.gpart"))
    want = {name: getattr(state_of(model).config, name) for name in config.STORED}
    assert {name: art.meta[name] for name in config.STORED} == want
    assert {name: getattr(art.config, name) for name in config.STORED} == want
    assert {name: summarize(art)[name] for name in config.STORED} == want


@pytest.mark.parametrize("where,call", [
    ("d", lambda: gpart.GPartConfig(d=0)),
    ("recipe field method.d", lambda: recipe.from_dict({"model": {"name_or_path": "x"}, "method": {"d": 0}})),
    ("--d", lambda: sweep.parse_ints("0", "--d")),
    ("d", lambda: gpart.group_ids(10, 0, 0)),
])
def test_d_has_one_check_and_one_message(where, call):
    with pytest.raises(GpartError, match=f"^{where} = 0 is out of range: d must be an integer with 1 <= d <= N, the "
                                         f"number of adapted parameters"):
        call()
