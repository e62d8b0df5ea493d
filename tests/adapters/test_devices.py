"""One place decides device and precision: --device for train/eval/merge, eval in the run's precision."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gpart_cli.adapters.devices import Precision, autocast_dtype, eval_precision, resolve_device
from gpart_cli.commands.app import app
from gpart_cli.errors import GpartError
from tests.conftest import ASSETS, write_jsonl

runner = CliRunner()
NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cuda_when_torch_sees_one_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(GpartError, match=f"--device {name}: torch sees no CUDA device on this machine .*"
                                         f"pass --device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "banana", "cuda:x"])
def test_unknown_devices_are_named(name):
    with pytest.raises(GpartError, match=f"--device {name!r} is not"):
        resolve_device(name)


def test_autocast_follows_train_precision():
    cpu = torch.device("cpu")
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("auto", cpu) is None  # auto: bf16 on GPUs only


def test_eval_precision_is_the_runs_unless_overridden():
    cpu = torch.device("cpu")
    bf16_run = {"model": {"dtype": "bfloat16"}, "train": {"precision": "auto"}}
    assert eval_precision(cpu, bf16_run) == Precision("bfloat16", None)
    assert eval_precision(cpu, {"model": {"dtype": "float32"}, "train": {"precision": "bf16"}}) == \
        Precision("float32", torch.bfloat16)
    assert eval_precision(cpu, bf16_run, "fp32") == Precision("float32", None)       # --dtype wins, no autocast
    assert eval_precision(cpu, None) == Precision("float32", None)                   # plain model on the CPU
    assert eval_precision(torch.device("cuda"), None) == Precision("auto", None)     # its checkpoint's dtype
    with pytest.raises(GpartError, match="--dtype 'int8' is not supported"):
        eval_precision(cpu, None, "int8")


def test_precision_records_what_the_weights_hold():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert Precision("auto", torch.bfloat16).record(model) == {"dtype": "bfloat16", "autocast": "bfloat16"}


@pytest.mark.skipif(not NO_CUDA, reason="checks the error a machine without CUDA gives")
def test_every_command_refuses_a_missing_gpu_with_exit_code_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: x}\n")
    for args in (["train", str(recipe), "--device", "cuda"],
                 ["eval", "--task", "gsm8k", "--model", "x", "--device", "cuda"],
                 ["merge", "x", str(tmp_path / "a.gpart"), "-o", str(tmp_path / "m"), "--device", "cuda"],
                 ["sweep-d", str(recipe), "--d", "8", "--device", "cuda", "-o", str(tmp_path / "s")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "torch sees no CUDA device" in res.output and "Traceback" not in res.output


def test_generation_scores_record_device_dtype_length_and_batch(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", [{"question": "What is 2 + 3?", "answer": "#### 5"}] * 3)
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--model", str(tiny_llama_dir), "--data", str(data),
                              "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu",
                              "--output", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert {k: doc[k] for k in ("device", "dtype", "autocast", "max_new_tokens", "batch_size")} == \
        {"device": "cpu", "dtype": "float32", "autocast": None, "max_new_tokens": 4, "batch_size": 2}
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--model", str(tiny_llama_dir), "--data", str(data),
                              "--max-new-tokens", "4", "--dtype", "bfloat16", "--output", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["dtype"] == "bfloat16"


def test_default_generation_length_is_the_tasks(tiny_llama_dir, tmp_path, monkeypatch):
    import gpart_cli.evaluation.runner as runner_module

    seen = []

    def fake_generation(name, model, tokenizer, rows, batch_size, max_new_tokens, console=None, autocast=None,
                        rendering=None):
        seen.append(max_new_tokens)
        return {"n": len(rows)}, []

    monkeypatch.setattr(runner_module, "run_generation", fake_generation)
    req = runner_module.EvalRequest(task="math", model=str(tiny_llama_dir), limit=2, output=tmp_path / "m.json",
                                    data=[str(ASSETS / "math" / "test.jsonl")])
    doc = runner_module.evaluate(req)
    assert seen == [None] and doc["max_new_tokens"] == 2048  # the task resolves None to MetaMath's eval_math.py


def test_classification_scores_record_device_and_dtype(tiny_bert_dir, sst2_files, tmp_path):
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--model", str(tiny_bert_dir), "--data",
                              str(sst2_files[1]), "--limit", "8", "--output", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert (doc["device"], doc["dtype"], doc["batch_size"], doc["scores"].keys() == {"accuracy"}) == \
        ("cuda:0" if torch.cuda.is_available() else "cpu", "float32", 32, True)
    assert "max_new_tokens" not in doc


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device; test_generation_scores_record_device_dtype_length_and_batch"
                                    " is its CPU twin")
def test_generation_on_cuda_runs_there_in_the_checkpoints_dtype(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", [{"question": "What is 2 + 3?", "answer": "#### 5"}] * 3)
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--model", str(tiny_llama_dir), "--data", str(data),
                              "--max-new-tokens", "4", "--device", "cuda", "--output", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["device"].startswith("cuda") and doc["dtype"] == "float32"  # the tiny checkpoint is saved in fp32


@pytest.mark.slow
def test_an_adapter_is_scored_in_the_dtype_its_run_trained_in(tiny_llama_dir, tmp_path):
    from gpart_cli.recipe.schema import from_dict
    from gpart_cli.train.run import run

    gsm = ASSETS / "gsm8k"
    recipe = from_dict({
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "bfloat16"},
        "method": {"name": "gpart", "d": 64, "target_modules": ["q_proj", "v_proj"]},
        "data": {"family": "sft", "task": "gsm8k", "train_files": [str(gsm / "train.jsonl")],
                 "max_train_samples": 12, "dev_samples": 4, "max_length": 320},
        "train": {"max_steps": 1, "batch_size": 4, "eval_before": False},
        "eval": {"task": "gsm8k", "files": [str(gsm / "test.jsonl")], "limit": 2, "max_new_tokens": 3},
        "name": "b"})
    run(recipe, tmp_path / "run", device="cpu")
    common = ["eval", "--task", "gsm8k", "--adapter", str(tmp_path / "run"), "--model", str(tiny_llama_dir),
              "--data", str(gsm / "test.jsonl"), "--limit", "2", "--max-new-tokens", "3"]
    res = runner.invoke(app, [*common, "--output", str(tmp_path / "run.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run.json").read_text())["dtype"] == "bfloat16"   # the recipe's model.dtype
    res = runner.invoke(app, [*common, "--dtype", "float32", "--output", str(tmp_path / "fp32.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "fp32.json").read_text())["dtype"] == "float32"
