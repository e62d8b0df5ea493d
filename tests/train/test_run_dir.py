"""The run dir's states: a start that failed before its first step never blocks the same command; a run with any
checkpoint, adapter or result stays protected; every refusal names every way out that applies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train import run_dir
from gpart_cli.train.run_dir import DirState
from tests.conftest import ASSETS, glue_recipe, head_rows, write_jsonl

runner = CliRunner()
RECIPE = from_dict({"model": {"name_or_path": "m"}, "data": {"family": "glue", "task": "sst2"}, "name": "t"})
ROOT = Path(__file__).resolve().parents[2]


def _dir(tmp_path: Path, *files: str) -> Path:
    """A run dir holding these files (a trailing / makes an empty directory)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in files:
        path = out / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(RECIPE.to_dict()) if name == "recipe.yaml" else "x")
    return out


@pytest.mark.parametrize("files, state", [
    ((), DirState.EMPTY),
    (("recipe.yaml",), DirState.FAILED_START),
    (("recipe.yaml", "checkpoints/"), DirState.FAILED_START),  # an empty checkpoints/ holds nothing
    (("recipe.yaml", "checkpoints/last/state.json"), DirState.RESUMABLE),
    (("recipe.yaml", "checkpoints/best/state.json"), DirState.ENDED),
    (("recipe.yaml", "metrics.jsonl"), DirState.ENDED),
    (("recipe.yaml", "adapter.gpart", "results.json"), DirState.ENDED),
    (("recipe.yaml", "model/config.json"), DirState.ENDED),
    (("notes.txt",), DirState.FOREIGN),
])
def test_state_of(tmp_path, files, state):
    assert run_dir.state_of(_dir(tmp_path, *files)) is state


def test_absent_and_a_file(tmp_path):
    assert run_dir.state_of(tmp_path / "nope") is DirState.ABSENT
    (tmp_path / "f").write_text("x")
    with pytest.raises(GpartError, match=r"--output .*f is a file, not a directory"):
        run_dir.state_of(tmp_path / "f")


@pytest.mark.parametrize("resume, overwrite", [(False, False), (True, False), (False, True)])
def test_a_failed_start_starts_afresh_whatever_the_flags(tmp_path, resume, overwrite):
    out = _dir(tmp_path, "recipe.yaml")
    other = from_dict({"model": {"name_or_path": "other"}, "data": {"family": "glue", "task": "cola"}})
    plan = run_dir.plan(out, other, resume=resume, overwrite=overwrite)
    assert (plan.resume, plan.replace) == (False, False)
    assert plan.note == (f"{out} holds only the recipe.yaml of a start that failed before its first step (no "
                         f"checkpoint, adapter or results): starting afresh there")
    run_dir.begin(plan, other)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["name_or_path"] == "other"


# Each refusal and the exact ways out it names.
@pytest.mark.parametrize("files, resume, overwrite, ways_out", [
    (("recipe.yaml", "checkpoints/last/state.json"), False, False,
     "already holds a run; pass --resume to continue it, --overwrite to replace it, or --output DIR"),
    (("recipe.yaml", "results.json", "adapter.gpart"), False, False,
     "already holds a finished run; pass --overwrite to replace it, or --output DIR"),
    (("recipe.yaml", "metrics.jsonl"), True, False,
     "holds a run with no checkpoint to resume from; pass --overwrite instead of --resume to train it again, "
     "or --output DIR"),
    ((), True, False, "holds no run to resume; drop --resume to start a new run there, or pass the --output"),
    (("notes.txt", "data.csv"), False, False,
     "holds files gpart did not write (data.csv, notes.txt); pass --output DIR to train in another directory "
     "(--overwrite replaces only gpart run dirs)"),
    (("notes.txt",), False, True, "holds files gpart did not write (notes.txt); pass --output DIR"),
    (("notes.txt",), True, False, "holds files gpart did not write (notes.txt); pass --output DIR"),
])
def test_refusals_name_every_way_out(tmp_path, files, resume, overwrite, ways_out):
    out = _dir(tmp_path, *files)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(GpartError) as e:
        run_dir.plan(out, RECIPE, resume=resume, overwrite=overwrite)
    assert ways_out in str(e.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # plan() only reads


def test_resume_with_a_changed_recipe_names_the_ways_out(tmp_path):
    out = _dir(tmp_path, "recipe.yaml", "checkpoints/last/state.json")
    changed = from_dict({"model": {"name_or_path": "m"}, "data": {"family": "glue", "task": "sst2"}, "name": "t",
                         "train": {"lr_theta": 0.5}})
    with pytest.raises(GpartError, match=r"train.lr_theta: 0.005 -> 0.5\). Resume with the original recipe, "
                                         r"start over with --overwrite, or train the changed recipe with --output"):
        run_dir.plan(out, changed, resume=True, overwrite=False)
    assert run_dir.plan(out, RECIPE, resume=True, overwrite=False).resume


def test_a_finished_run_also_differs_in_what_its_scores_depend_on(tmp_path):
    """`sweep-d` reuses finished runs as they are: eval.limit changed their scores, though a --resume may change it."""
    sft = {"model": {"name_or_path": "m"}, "data": {"family": "sft", "task": "gsm8k"}, "name": "t",
           "eval": {"task": "gsm8k", "limit": 20}}
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump(from_dict(sft).to_dict()))
    more = from_dict({**sft, "eval": {"task": "gsm8k", "limit": 50}, "train": {"max_steps": 5}})
    assert run_dir.recipe_changes(out, more) == ["train.max_steps: None -> 5"]
    assert run_dir.recipe_changes(out, more, finished=True) == ["eval.limit: 20 -> 50", "train.max_steps: None -> 5"]
    assert run_dir.recipe_changes(out, from_dict(sft), finished=True) == []


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(GpartError, match="--resume and --overwrite contradict each other"):
        run_dir.plan(tmp_path / "run", RECIPE, resume=True, overwrite=True)


def test_overwrite_deletes_the_old_run_only_in_begin(tmp_path):
    out = _dir(tmp_path, "recipe.yaml", "checkpoints/last/state.json", "results.json")
    plan = run_dir.plan(out, RECIPE, resume=False, overwrite=True)
    assert plan.replace and (out / "results.json").is_file()
    run_dir.begin(plan, RECIPE)
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]


def _quickstart(tmp_path: Path, data: Path) -> Path:
    """The README quickstart recipe, its data pointed at `data/` and cut to a 2-step run."""
    raw = yaml.safe_load((ROOT / "recipes" / "quickstart-sst2-minilm.yaml").read_text())
    raw["data"].update(train_files=[str(data / "train.jsonl")], eval_files=[str(data / "validation.jsonl")],
                       max_train_samples=40)
    raw["train"].update(max_steps=2, batch_size=8)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.assets
def test_quickstart_that_failed_at_data_loading_succeeds_with_the_same_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data, out = tmp_path / "data", tmp_path / "runs" / "quickstart"
    command = ["train", str(_quickstart(tmp_path, data)), "--output", str(out)]
    failed = runner.invoke(app, command)
    assert failed.exit_code == 2, failed.output
    assert not out.exists()  # nothing written: the data never loaded

    data.mkdir()
    write_jsonl(data / "train.jsonl", head_rows(ASSETS / "glue" / "sst2" / "train.jsonl", 40))
    write_jsonl(data / "validation.jsonl", head_rows(ASSETS / "glue" / "sst2" / "validation.jsonl", 16))
    done = runner.invoke(app, command)
    assert done.exit_code == 0, done.output
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert {"recipe.yaml", "metrics.jsonl", "checkpoints", "adapter.gpart", "results.json"} <= \
        {p.name for p in out.iterdir()}

    again = runner.invoke(app, command)  # a finished run stays protected
    assert again.exit_code == 2 and "already holds a run; pass --resume" in again.output


@pytest.mark.slow
def test_a_dir_left_by_a_start_that_failed_is_reused_by_the_same_command(tiny_bert_dir, sst2_files, tmp_path):
    """As older gpart left it (recipe.yaml written before the data loaded): the same command trains there."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2).to_dict()))
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(recipe, out / "recipe.yaml")
    res = runner.invoke(app, ["train", str(recipe), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "start that failed before its first step" in " ".join(res.output.split())
    assert (out / "results.json").is_file()
