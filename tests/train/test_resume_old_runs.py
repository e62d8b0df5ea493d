"""--resume of a run recorded before the fields of issue 10 existed: unchanged meaning resumes, changed meaning is named."""

from __future__ import annotations

import pytest
import yaml

from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train.run_dir import plan

NEW_FIELDS = {"data": ("revision", "train_transform", "eval_transform"), "eval": ("dev_batch_size",)}


def _recorded_before(out, recipe) -> None:
    """A run dir whose recipe.yaml lacks the new fields, as older gpart wrote it, with a checkpoint to resume."""
    old = recipe.to_dict()
    for section, keys in NEW_FIELDS.items():
        for key in keys:
            del old[section][key]
    (out / "checkpoints" / "last").mkdir(parents=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(old))


def test_an_old_glue_run_resumes(tmp_path):
    recipe = from_dict({"model": {"name_or_path": "m"}, "data": {"family": "glue", "task": "sst2"}})
    _recorded_before(tmp_path, recipe)
    plan(tmp_path, recipe, resume=True, overwrite=False)


def test_an_old_vision_run_is_told_how_to_continue_as_it_began(tmp_path):
    recipe = from_dict({"model": {"name_or_path": "m"}, "data": {"family": "vision", "task": "fashion_mnist"}})
    _recorded_before(tmp_path, recipe)
    with pytest.raises(GpartError, match="data.eval_transform: 'resize' -> 'center_crop'; "
                                         "data.train_transform: 'resize' -> 'random_resized_crop'"):
        plan(tmp_path, recipe, resume=True, overwrite=False)
    as_it_began = from_dict({"model": {"name_or_path": "m"}, "data": {"family": "vision", "task": "fashion_mnist",
                                                                      "train_transform": "resize",
                                                                      "eval_transform": "resize"}})
    plan(tmp_path, as_it_began, resume=True, overwrite=False)
