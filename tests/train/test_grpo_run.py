"""`gpart train` with rl.objective: grpo on a tiny Llama (docs/rl.md): the run dir, the reward curve, and an adapter
that `gpart eval` loads and scores exactly as the run's own after-evaluation did."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from gpart_cli.commands.app import app

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # whole `gpart train` / `gpart eval` runs, tens of seconds each

ROWS = [{"original_text": f"Sam has {a} pens and gets {b} more. How many pens?", "ans": a + b}
        for a, b in [(2, 3), (4, 1), (5, 5), (7, 2), (1, 1), (3, 6)]]


def recipe(tmp_path, tiny_llama_dir, **rl) -> str:
    rows = tmp_path / "mawps.json"
    rows.write_text(json.dumps(ROWS))
    doc = {"model": {"name_or_path": str(tiny_llama_dir)},
           "method": {"name": "gpart", "d": 64, "target_modules": ["q_proj", "v_proj"]},
           "data": {"family": "sft", "task": "mawps", "train_files": [str(rows)]},
           "train": {"max_steps": 2, "batch_size": 2, "lr_theta": 0.05, "seed": 0},
           "eval": {"task": "mawps", "files": [str(rows)], "limit": 3, "batch_size": 3, "max_new_tokens": 4},
           "rl": {"objective": "grpo", "group_size": 3, "max_completion_length": 4, "format_reward": 0.5, **rl}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_grpo_run_dir_and_its_adapter_in_gpart_eval(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", recipe(tmp_path, tiny_llama_dir), "--output", str(out)])
    assert res.exit_code == 0, res.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(0 <= m["reward"] <= 1.5 and set(m["rewards"]) == {"mawps_metamath", "format"} for m in metrics)
    assert (out / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "last" / "adapter.gpart").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["objective"] == "grpo" and results["steps"] == 2 and results["trainable_params"] == 64
    assert results["reward"]["first"] == metrics[0]["reward"] and results["reward"]["last"] == metrics[1]["reward"]
    assert results["before"]["n"] == results["after"]["n"] == 3
    scores = tmp_path / "scores.json"
    res = CliRunner().invoke(app, ["eval", "--task", "mawps", "--adapter", str(out), "--model", str(tiny_llama_dir),
                                   "--data", str(tmp_path / "mawps.json"), "--limit", "3", "--batch-size", "3",
                                   "--max-new-tokens", "4", "--output", str(scores)])
    assert res.exit_code == 0, res.output
    assert json.loads(scores.read_text())["scores"] == results["after"]
    # The same prompts decoded from the loaded adapter give the run's own outputs, token for token.
    recorded = [json.loads(line)["output"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [json.loads(line)["output"] for line in
            (tmp_path / "scores.predictions.jsonl").read_text().splitlines()] == recorded


def test_grpo_refuses_what_it_cannot_train(tmp_path, tiny_llama_dir):
    runner = CliRunner()
    for extra, needle in ((["--set", "method.name=full"], "method full has none"),
                          (["--set", "data.task=metamathqa"], "data.task to one of"),
                          (["--set", "rl.reward=strict"], "rl.reward = 'strict' is not a scorer of task mawps"),
                          (["--set", "method.dropout=0.1"], "method.dropout: 0")):
        res = runner.invoke(app, ["train", recipe(tmp_path, tiny_llama_dir), "--output", str(tmp_path / "x"), *extra])
        assert res.exit_code == 2 and needle in res.output, (extra, res.output)


@pytest.mark.parametrize("name", ["lora", "unilora"])
def test_peft_methods_run_the_same_objective(tmp_path, tiny_llama_dir, name):
    out = tmp_path / name
    res = CliRunner().invoke(app, ["train", recipe(tmp_path, tiny_llama_dir, kl_weight=0.05), "--output", str(out),
                                   "--set", f"method.name={name}", "--set", "train.max_steps=1",
                                   "--set", "train.eval_before=false"])
    assert res.exit_code == 0, res.output
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "reward" in record and record["kl"] >= 0  # KL to the adapter-disabled base, as TRL computes it
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "results.json").read_text())["method"] == name


def test_gpart_kl_is_measured_against_the_starting_theta(tmp_path, tiny_llama_dir):
    # θ starts away from zero: a reference at θ = 0 (the bare base, which TRL would load again) would show KL > 0 on
    # the first step, the starting θ exactly 0.
    out = tmp_path / "kl"
    res = CliRunner().invoke(app, ["train", recipe(tmp_path, tiny_llama_dir, kl_weight=0.05), "--output", str(out),
                                   "--set", "train.eval_before=false", "--set", "method.init_bound=0.2",
                                   "--set", "train.max_steps=1"])
    assert res.exit_code == 0, res.output
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["kl"] == 0.0


def test_an_interrupted_grpo_run_resumes_from_its_last_checkpoint(tmp_path, tiny_llama_dir, monkeypatch):
    from gpart_cli.train.grpo import GPartGRPOTrainer

    out, path = tmp_path / "run", recipe(tmp_path, tiny_llama_dir)
    flags = ["--set", "train.save_every=1", "--set", "train.eval_before=false", "--set", "eval.task=null"]
    original = GPartGRPOTrainer.training_step

    def killed_in_step_2(self, *args, **kwargs):
        if self.state.global_step == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPartGRPOTrainer, "training_step", killed_in_step_2)
    res = CliRunner().invoke(app, ["train", path, "--output", str(out), *flags])
    assert res.exit_code != 0 and (out / "checkpoints" / "last").resolve().name == "checkpoint-1"
    monkeypatch.setattr(GPartGRPOTrainer, "training_step", original)
    res = CliRunner().invoke(app, ["train", path, "--output", str(out), "--resume", *flags])
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and (out / "checkpoints" / "last").resolve().name == "checkpoint-2"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "results.json").read_text())["steps"] == 2
