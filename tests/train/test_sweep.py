"""`gpart sweep-d`: one run per (method, d, seed), skip finished runs, log failures, table + CSV/JSON + PNG."""

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.train.trainer import Trainer
from tests.conftest import glue_recipe, interrupt_training_at

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_sweep_grid_files_rerun_and_failures(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2).to_dict()))
    out = tmp_path / "sweep"
    # d = 10**7 exceeds N of the tiny model: that run fails, is logged, and the sweep goes on.
    args = ["sweep-d", str(recipe), "--d", "64,256,10000000", "--seeds", "0,1", "--method", "gpart,lora",
            "--output", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["d"], r["seed"]) for r in rows] == [
        ("gpart", "64", "0"), ("gpart", "64", "1"), ("gpart", "256", "0"), ("gpart", "256", "1"),
        ("lora", "", "0"), ("lora", "", "1")]
    assert all(r["metric"] == "accuracy" and 0 <= float(r["score"]) <= 1 for r in rows)
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["run"] for f in failures] == ["gpart-d10000000-s0", "gpart-d10000000-s1"]
    assert "out of range" in failures[0]["error"]
    doc = json.loads((out / "results.json").read_text())
    summary = {(s["method"], s["d"]): s for s in doc["summary"]}
    assert set(summary) == {("gpart", 64), ("gpart", 256), ("lora", None)} and summary[("gpart", 64)]["seeds"] == 2
    scores = [float(r["score"]) for r in rows[:2]]
    assert summary[("gpart", 64)]["median"] == pytest.approx(sum(scores) / 2)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "gpart-d64-s1" / "adapter.gpart").is_file() and (out / "lora-s0" / "adapter").is_dir()

    # Rerun: every finished run is reused, nothing retrains, the same table comes out.
    mtime = (out / "gpart-d64-s0" / "results.json").stat().st_mtime_ns
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and res.output.count("already finished") == 6
    assert (out / "gpart-d64-s0" / "results.json").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["summary"] == doc["summary"]


def test_runs_of_another_recipe_are_refused_or_rerun(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2).to_dict()))
    out = tmp_path / "sweep"
    args = ["sweep-d", str(recipe), "--d", "64", "--seeds", "0,1", "--output", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    (out / "gpart-d64-s1" / "results.json").unlink()  # as if interrupted after its last checkpoint
    before = (out / "gpart-d64-s0" / "results.json").read_text()

    res = runner.invoke(app, [*args, "--set", "train.max_steps=3"])
    assert res.exit_code == 2
    assert (f"error: {out} holds runs of another recipe than this sweep's: gpart-d64-s0 (train.max_steps: 2 -> 3); "
            f"gpart-d64-s1 (train.max_steps: 2 -> 3). Pass --rerun-changed to train those again (their old runs are "
            f"replaced), sweep with the recipe they were trained with, or pass --output DIR for a new sweep") \
        in res.output
    assert (out / "gpart-d64-s0" / "results.json").read_text() == before  # nothing was touched
    assert not (out / "gpart-d64-s1" / "results.json").exists()

    res = runner.invoke(app, [*args, "--set", "train.max_steps=3", "--rerun-changed"])
    assert res.exit_code == 0, res.output
    assert "already finished" not in res.output and "resuming" not in res.output  # both trained again, afresh
    for folder in ("gpart-d64-s0", "gpart-d64-s1"):
        assert json.loads((out / folder / "results.json").read_text())["steps"] == 3
        assert yaml.safe_load((out / folder / "recipe.yaml").read_text())["train"]["max_steps"] == 3
    res = runner.invoke(app, [*args, "--set", "train.max_steps=3"])  # now they match: reused
    assert res.exit_code == 0 and res.output.count("already finished") == 2


def test_an_interrupted_sweep_says_how_to_go_on(tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=3).to_dict()))
    args = ["sweep-d", str(recipe), "--d", "64", "--output", str(tmp_path / "sweep")]
    original = interrupt_training_at(monkeypatch, 2)
    res = runner.invoke(app, args)
    assert res.exit_code == 130
    assert "interrupted: checkpoint at step 2/3" in res.output
    assert "sweep interrupted: run the same gpart sweep-d command again to go on (finished runs are reused, the " \
           "interrupted one resumes)" in res.output
    monkeypatch.setattr(Trainer, "_train_step", original)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"resuming {tmp_path / 'sweep' / 'gpart-d64-s0'} at step 2/3" in res.output


@pytest.mark.parametrize("args,message", [
    (["--d", "1k"], "--d '1k' should be comma-separated integers"),
    (["--d", "100", "--method", "gpart,adapterx"], "--method 'gpart,adapterx': use some of"),
    (["--d", "0"], "--d = 0 is out of range: d must be an integer with 1 <= d <= N"),
    (["--d", "8", "--device", "tpu"], "--device 'tpu' is not a device"),
])
def test_sweep_bad_flags(tmp_path, args, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: x}\n")
    res = runner.invoke(app, ["sweep-d", str(recipe), *args, "--output", str(tmp_path / "s")])
    assert res.exit_code == 2 and message in " ".join(res.output.split())


def _rows(*cells):
    """Rows of one (method, d, seed) cell: (lr, dev_score, test score)."""
    return [{"method": "gpart", "d": 64, "seed": 0, "lr": lr, "lr_head": None, "dev_score": dev, "score": test,
             "selected": False} for lr, dev, test in cells]


def test_selection_follows_dev_not_test():
    from gpart_cli.train.sweep import select_by_dev, summarize

    # The best test score (0.9 at lr 0.05) has the worst dev score: dev picks lr 0.02.
    rows = select_by_dev(_rows((0.005, 0.70, 0.60), (0.02, 0.80, 0.70), (0.05, 0.50, 0.90)))
    assert [r["selected"] for r in rows] == [False, True, False]
    assert summarize(rows) == [{"method": "gpart", "d": 64, "median": 0.70, "min": 0.70, "max": 0.70, "seeds": 1,
                                "lrs": [0.02], "lr_heads": [None]}]
    # A run without a dev score never beats one with it; with none scored, the first run stands.
    assert [r["selected"] for r in select_by_dev(_rows((0.005, None, 0.9), (0.02, 0.1, 0.2)))] == [False, True]
    assert [r["selected"] for r in select_by_dev(_rows((0.005, None, 0.9), (0.02, None, 0.2)))] == [True, False]


@pytest.mark.parametrize("devs, picked", [
    ((0.8, 0.8, 0.8), 1),       # a plateau: its middle, not its first lr
    ((0.8, 0.8, 0.7), 1),       # the tied run nearer the grid's middle
    ((0.7, 0.8, 0.8), 1),
    ((0.8, 0.7, 0.8), 0),       # both ends tie, equally far from the middle: the earlier
    ((0.8, 0.8), 0),            # two-point grid: the earlier
    ((0.8, 0.8, 0.7, 0.6), 1),  # four points (middle 1.5): of 0 and 1, 1 is nearer
    ((0.6, 0.7, 0.8, 0.8), 2),
    ((0.8, 0.6, 0.6, 0.8), 0),
    ((0.5, 0.8, 0.8, 0.8), 1),  # 1 and 2 equally near the middle: the earlier
    ((0.9, 0.8, 0.8), 0),       # no tie: the best dev score, wherever it sits
])
def test_dev_ties_go_to_the_middle_of_the_grid(devs, picked):
    from gpart_cli.train.sweep import select_by_dev

    rows = select_by_dev(_rows(*[(0.001 * 2 ** i, dev, 1.0 - 0.1 * i) for i, dev in enumerate(devs)]))
    assert [r["selected"] for r in rows] == [i == picked for i in range(len(devs))]


def test_selection_cells_can_be_keyed_by_task():
    from gpart_cli.train.sweep import select_by_dev

    rows = [{**r, "task": t} for t in ("sst2", "cola") for r in _rows((0.005, 0.8, 0.1), (0.02, 0.8, 0.2),
                                                                     (0.05, 0.8 if t == "sst2" else 0.9, 0.3))]
    assert [r["selected"] for r in select_by_dev(rows, cell=("task", "method", "d", "seed"))] == [
        False, True, False, False, False, True]
    # Keyed by (method, d, seed) alone the six runs are one cell: the single best dev score wins.
    assert [r["selected"] for r in select_by_dev(rows)] == [False, False, False, False, False, True]


def test_lr_grid_flags_and_run_overrides():
    from gpart_cli.train.sweep import RunKey, parse_lr_grid, parse_lr_head, plan

    grid = parse_lr_grid(["5e-3,2e-2", "full=5e-5"], ["gpart", "full", "linear_probe"])
    assert grid == {"gpart": [5e-3, 2e-2], "full": [5e-5], "linear_probe": [5e-3, 2e-2]}
    assert parse_lr_grid([], ["gpart"]) == {"gpart": [None]}
    assert parse_lr_head("tie") == ["tie"] and parse_lr_head("1e-3,1e-2") == [1e-3, 1e-2] and parse_lr_head(None) == [None]
    keys = plan(["gpart", "linear_probe"], [64], [0], grid, [1e-3, 1e-2])
    assert [k.folder for k in keys] == ["gpart-d64-lr0.005-lrh0.001-s0", "gpart-d64-lr0.005-lrh0.01-s0",
                                        "gpart-d64-lr0.02-lrh0.001-s0", "gpart-d64-lr0.02-lrh0.01-s0",
                                        "linear_probe-lr0.005-s0", "linear_probe-lr0.02-s0"]
    assert RunKey("gpart", 64, 1, 0.02, "tie").overrides() == [
        "method.name=gpart", "method.seed=1", "train.seed=1", "method.d=64", "train.lr_theta=0.02",
        "train.lr_head=0.02"]
    # A linear probe has no adapter: its lr is the head's.
    assert RunKey("linear_probe", None, 0, 0.05).overrides()[-1] == "train.lr_head=0.05"
    assert RunKey("gpart", 64, 0).folder == "gpart-d64-s0"  # no grid: the folder names of earlier sweeps


@pytest.mark.parametrize("args,message", [
    (["--d", "64", "--lr", "fast"], "--lr 'fast' should be comma-separated positive numbers"),
    (["--d", "64", "--lr", "lora=1e-3"], "'lora' is not one of the swept methods (gpart)"),
    (["--d", "64", "--lr-head", "-1"], "--lr-head '-1' should be comma-separated positive numbers"),
])
def test_sweep_bad_lr_flags(tmp_path, args, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: x}\n")
    res = runner.invoke(app, ["sweep-d", str(recipe), *args, "--output", str(tmp_path / "s")])
    assert res.exit_code == 2 and message in " ".join(res.output.split())


def test_sweep_lr_grid_picks_on_dev_and_reuses_runs(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2).to_dict()))
    out = tmp_path / "sweep"
    args = ["sweep-d", str(recipe), "--d", "64", "--method", "gpart", "--lr", "1e-3,5e-2", "--lr-head", "tie",
            "--output", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    folders = ["gpart-d64-lr0.001-lrh-tie-s0", "gpart-d64-lr0.05-lrh-tie-s0"]
    saved = [yaml.safe_load((out / f / "recipe.yaml").read_text())["train"] for f in folders]
    assert [(t["lr_theta"], t["lr_head"]) for t in saved] == [(1e-3, 1e-3), (5e-2, 5e-2)]
    doc = json.loads((out / "results.json").read_text())
    devs = [json.loads((out / f / "results.json").read_text())["best_dev"]["accuracy"] for f in folders]
    assert [r["dev_score"] for r in doc["runs"]] == devs
    assert [r["selected"] for r in doc["runs"]] == [devs[0] >= devs[1], devs[1] > devs[0]]  # ties: the first
    assert "lr chosen per seed on the dev split" in " ".join(res.output.split())

    # Make the test split disagree with dev: the first run now has the best test score and the worst dev score.
    # The rerun reuses both runs and still selects on dev.
    for folder, dev, test in ((folders[0], 0.0, 1.0), (folders[1], 1.0, 0.25)):
        path = out / folder / "results.json"
        results = json.loads(path.read_text())
        results["best_dev"]["accuracy"], results["after"]["accuracy"] = dev, test
        path.write_text(json.dumps(results))
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and res.output.count("already finished") == 2
    doc = json.loads((out / "results.json").read_text())
    assert [r["selected"] for r in doc["runs"]] == [False, True]
    assert doc["summary"] == [{"method": "gpart", "d": 64, "median": 0.25, "min": 0.25, "max": 0.25, "seeds": 1,
                               "lrs": [0.05], "lr_heads": [0.05]}]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["lr"], r["selected"], r["score"]) for r in rows] == [("0.001", "False", "1.0"), ("0.05", "True", "0.25")]


def test_lr_grid_without_a_dev_split_is_refused(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, data__dev_fraction=0.0).to_dict()))
    res = runner.invoke(app, ["sweep-d", str(recipe), "--d", "64", "--lr", "1e-3,1e-2", "--output", str(tmp_path / "s")])
    assert res.exit_code == 2 and "needs a dev split: set data.dev_fraction > 0" in " ".join(res.output.split())


@pytest.mark.parametrize("task,metric", [("gsm8k", "metamath"), ("math", "is_equiv"), ("math500", "is_equiv"),
                                         ("mawps", "metamath"), (None, "loss")])
def test_sft_sweeps_report_the_task_headline_rule(task, metric):
    from gpart_cli.recipe.schema import from_dict
    from gpart_cli.train.sweep import main_metric

    recipe = from_dict({"model": {"name_or_path": "x"}, "data": {"family": "sft"}, "eval": {"task": task}})
    assert main_metric(recipe) == metric
