"""Recipe validation (docs/design.md §6): strict keys with suggestions, types, ranges, overrides, YAML errors."""

import re

import pytest

from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import apply_overrides, from_dict, load_recipe

BASE = {"model": {"name_or_path": "m"}}


def _with(section, **values):
    raw = {k: dict(v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def test_defaults_and_yaml_style_numbers():
    r = from_dict(_with("train", lr_theta="5e-3", epochs=3))
    assert r.train.lr_theta == 0.005 and r.train.epochs == 3.0 and r.method.name == "gpart"
    assert r.method.target_modules == ["query", "value"] and r.model.trust_remote_code is False
    # Unset: the task's generation length, the training micro-batch for the dev loss, the authors' vision transforms.
    assert (r.eval.max_new_tokens, r.eval.dev_batch_size, r.data.revision) == (None, None, None)
    assert (r.data.train_transform, r.data.eval_transform) == ("random_resized_crop", "center_crop")


@pytest.mark.parametrize("raw,message", [
    ({**BASE, "trian": {}}, "unknown recipe key 'trian'; did you mean train?"),
    (_with("train", lr_thetta=1), "unknown recipe key 'train.lr_thetta'; did you mean train.lr_theta?"),
    (_with("method", d="many"), "recipe field method.d = 'many' should be an integer"),
    (_with("method", d=0), "recipe field method.d = 0 is out of range: d must be an integer with 1 <= d <= N"),
    (_with("method", name="lorra"), "method.name = 'lorra' is not one of gpart, unilora, lora, full, linear_probe, "
                                    "vera (did you mean 'lora'?)"),
    (_with("train", batch_size=True), "train.batch_size = True should be an integer"),
    (_with("data", dev_fraction=1.5), "data.dev_fraction = 1.5 must be in [0, 1)"),
    (_with("train", weight_decay=-0.1), "train.weight_decay = -0.1 must be >= 0"),
    (_with("data", train_transform="random_crop"),
     "data.train_transform = 'random_crop' is not one of random_resized_crop, resize (did you mean "
     "'random_resized_crop'?)"),
    (_with("data", eval_transform="crop"), "data.eval_transform = 'crop' is not one of center_crop, resize"),
    (_with("eval", dev_batch_size=0), "recipe field eval.dev_batch_size = 0 must be >= 1"),
    ({"method": {}}, "model.name_or_path is missing"),
    ({**BASE, "model": "gpt2"}, "section model. should be a mapping"),
])
def test_bad_recipes_name_the_field(raw, message):
    with pytest.raises(GpartError, match=re.escape(message)):
        from_dict(raw)


def test_overrides_parse_values_as_yaml():
    raw = apply_overrides(dict(BASE), ["train.lr_theta=1e-3", "method.target_modules=[q_proj, v_proj]",
                                       "method.d=4096", "data.max_train_samples=null"])
    r = from_dict(raw)
    assert (r.train.lr_theta, r.method.target_modules, r.method.d, r.data.max_train_samples) == \
        (0.001, ["q_proj", "v_proj"], 4096, None)
    with pytest.raises(GpartError, match="should look like section.key=value"):
        apply_overrides({}, ["train.lr_theta"])


def test_load_recipe_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n train: [\n")
    with pytest.raises(GpartError, match=r"bad.yaml is not valid YAML at line 3"):
        load_recipe(bad)
    with pytest.raises(GpartError, match="recipe file .*missing.yaml does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: {name_or_path: x}\nmethod: {d: 8}\n")
    r = load_recipe(ok, ["method.seed=3"])
    assert (r.name, r.method.d, r.method.seed) == ("ok", 8, 3)
    with pytest.raises(GpartError, match=r"ok.yaml: unknown recipe key 'method.dd'; did you mean method.d\?"):
        load_recipe(ok, ["method.dd=3"])


def test_safe_load_refuses_python_tags(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(GpartError, match="not valid YAML"):
        load_recipe(evil)


# ---- fields a data family does not read (issue 30, item 4) ---------------------------------------------------

@pytest.mark.parametrize("family,section,field,value,applies,instead", [
    ("glue", "eval", "limit", 100, "sft", "set data.max_eval_samples instead"),
    ("text_classification", "eval", "files", ["x.jsonl"], "sft", "set data.eval_files instead"),
    ("vision", "eval", "max_new_tokens", 64, "sft", "remove it"),
    ("sft", "data", "max_eval_samples", 50, "glue, text_classification, vision", "set eval.limit instead"),
    ("sft", "data", "eval_files", ["x.jsonl"], "glue, text_classification, vision", "set eval.files instead"),
    ("vision", "data", "max_length", 64, "glue, text_classification, sft", "set data.image_size instead"),
    ("vision", "data", "dev_samples", 10, "glue, text_classification, sft", "set data.dev_fraction instead"),
    ("glue", "data", "image_size", 32, "vision", "set data.max_length instead"),
    ("sft", "data", "train_transform", "resize", "vision", "remove it"),
    ("glue", "data", "labels", ["a", "b"], "text_classification", "remove it"),
    ("vision", "data", "packing", True, "sft", "remove it"),
])
def test_a_field_the_family_does_not_read_is_refused(family, section, field, value, applies, instead):
    raw = {"model": {"name_or_path": "m"}, "data": {"family": family}}
    raw.setdefault(section, {})[field] = value
    with pytest.raises(GpartError) as e:
        from_dict(raw)
    assert str(e.value) == (f"recipe field {section}.{field} = {value!r} does nothing for data.family {family} "
                            f"(it applies to {applies}); {instead}")


def test_such_fields_at_their_defaults_and_in_their_own_family_are_fine():
    from_dict({"model": {"name_or_path": "m"}, "data": {"family": "glue", "max_length": 128, "packing": False},
               "eval": {"limit": None, "batch_size": 8}})
    from_dict({"model": {"name_or_path": "m"}, "data": {"family": "sft", "task": "gsm8k", "packing": True},
               "eval": {"task": "gsm8k", "limit": 20, "max_new_tokens": 64}})


def test_the_cli_refuses_eval_limit_for_glue_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from gpart_cli.commands.app import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: no/such-model}\ndata: {family: glue, task: sst2}\n")
    res = CliRunner().invoke(app, ["train", str(recipe), "--set", "eval.limit=100"])
    assert res.exit_code == 2
    assert (f"error: {recipe}: recipe field eval.limit = 100 does nothing for data.family glue (it applies to sft); "
            f"set data.max_eval_samples instead") in res.output
