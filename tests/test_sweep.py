"""`gpart sweep-d`: one run per (method, d, seed), skip finished runs, log failures, table + CSV/JSON + PNG."""

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from gpart_cli.cli.app import app
from tests.test_train_e2e import glue_recipe

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


@pytest.mark.parametrize("args,message", [
    (["--d", "1k"], "--d '1k' should be comma-separated integers"),
    (["--d", "100", "--method", "gpart,adapterx"], "--method 'gpart,adapterx': use some of"),
    (["--d", "0"], "all >= 1"),
])
def test_sweep_bad_flags(tmp_path, args, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: x}\n")
    res = runner.invoke(app, ["sweep-d", str(recipe), *args, "--output", str(tmp_path / "s")])
    assert res.exit_code == 2 and message in " ".join(res.output.split())
