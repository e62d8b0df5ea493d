"""`gpart merge` and `gpart inspect` through the CLI (docs/design.md §5)."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.commands.app import app
from tests.conftest import tiny_llama, tiny_roberta

runner = CliRunner()


def _saved_roberta_run(tmp_path):
    base = tiny_roberta(num_labels=3)
    base.save_pretrained(tmp_path / "base")
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=40, seed=1, target_modules=["query", "value"],
                                                               bias=True, head_modules=["classifier"]))
    with torch.no_grad():
        gpart.theta(model).copy_(torch.randn(40, generator=torch.Generator().manual_seed(0)))
        model.classifier.out_proj.bias.add_(0.5)
    task = {"type": "sequence_classification", "num_labels": 3, "labels": ["a", "b", "c"]}
    gpart.save(model, tmp_path / "a.gpart", task=task)
    return model, tmp_path / "base", tmp_path / "a.gpart"


def test_merge_writes_a_plain_model_with_the_same_outputs(tmp_path, tokens):
    model, base_dir, adapter = _saved_roberta_run(tmp_path)
    result = runner.invoke(app, ["merge", str(base_dir), str(adapter), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, model(tokens).logits, rtol=0, atol=1e-6)
        assert torch.equal(merged(tokens).logits, gpart.merge(copy.deepcopy(model))(tokens).logits)


def test_merge_casts_to_the_requested_dtype(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = gpart.apply(copy.deepcopy(base), gpart.GPartConfig(d=8, target_modules=["q_proj"]))
    gpart.save(model, tmp_path / "a.gpart")  # no task: the auto class comes from the base config
    result = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "a.gpart"),
                                 "-o", str(tmp_path / "m"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merge_errors_are_exit_code_2_without_traceback(tmp_path):
    model, base_dir, adapter = _saved_roberta_run(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "llama")
    result = runner.invoke(app, ["merge", str(tmp_path / "llama"), str(adapter), "-o", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "does not fit this model" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["merge", str(base_dir), str(tmp_path / "missing.gpart"), "-o", str(tmp_path / "m")])
    assert result.exit_code == 2 and "missing.gpart: no such file or directory" in result.output
    assert not (tmp_path / "m").exists()


def test_inspect_json_reports_metadata_and_theta_stats(tmp_path):
    model, _, adapter = _saved_roberta_run(tmp_path)
    result = runner.invoke(app, ["inspect", str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    theta = gpart.theta(model).detach().double()
    assert (info["d"], info["seed"], info["partition"], info["isometric"]) == (40, 1, "feistel-v1", True)
    assert info["n_params"] == 2 * 2 * (32 * 32 + 32)
    assert abs(info["theta"]["norm"] - float(theta.norm())) < 1e-9
    assert info["theta"]["fraction_nonzero"] == 1.0
    assert info["head"]["classifier.out_proj.weight"] == [3, 32]
    head = 32 * 32 + 32 + 3 * 32 + 3
    assert info["storage"]["lora_r8_params"] == 4 * 8 * (32 + 32) + head
    assert info["size_bytes"] == adapter.stat().st_size


def test_inspect_table_shows_the_essentials(tmp_path):
    _, _, adapter = _saved_roberta_run(tmp_path)
    result = runner.invoke(app, ["inspect", str(adapter)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("gpart/1", "feistel-v1", "40 · 1", "4 modules (query ×2, value ×2)", "sha256:", "LoRA r=8"):
        assert text in result.output, text


def test_inspect_of_a_corrupt_file_is_exit_code_2(tmp_path):
    (tmp_path / "bad.gpart").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    result = runner.invoke(app, ["inspect", str(tmp_path / "bad.gpart")])
    assert result.exit_code == 2 and "not a valid .gpart adapter" in result.output
    assert "Traceback" not in result.output


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    for command in ("train", "eval", "merge", "inspect", "push", "sweep-d"):
        assert command in result.output


@pytest.mark.slow
def test_cli_output_has_no_library_progress_bars():
    """datasets/transformers tqdm bars would interleave with Rich's display; the CLI switches them off."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gpart_cli", "train", "recipes/selfpretrain-vit-fashion6.yaml",
                           "--dry-run"], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "11,400 train / 600 dev" in done.stdout + done.stderr  # the dry run did load the 6-class data
    assert "Casting the dataset" not in done.stderr and "it/s]" not in done.stderr
