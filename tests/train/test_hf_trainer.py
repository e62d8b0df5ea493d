"""GPart in transformers' Trainer and TRL's SFTTrainer (docs/trainers.md): checkpoints hold the adapter and the
optimizer, not the base; save_model() writes an adapter gpart reads; resuming reaches the uninterrupted θ."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gpart_cli as gpart
from tests.conftest import tiny_llama

CFG = dict(d=64, seed=3, target_modules=("q_proj", "v_proj"))


class Rows(torch.utils.data.Dataset):
    """12 fixed token rows: the LM loss on all tokens."""

    def __init__(self, n: int = 12, width: int = 10) -> None:
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(3, 100, (n, width), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def make_trainer(out, max_steps: int, stop_at: int | None = None, **overrides):
    """A GPart Trainer on a tiny Llama; with `stop_at`, training stops after that step as if killed there."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == stop_at

    model = gpart.apply(tiny_llama(), gpart.GPartConfig(**CFG))
    args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.05,
                             save_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=7,
                             disable_tqdm=True, **overrides)
    return gpart.trainer(Trainer)(model=model, args=args, train_dataset=Rows(), callbacks=[Stop()])


def test_checkpoints_hold_the_adapter_and_optimizer_not_the_base(tmp_path):
    trainer = make_trainer(tmp_path, 2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert "adapter.gpart" in names and "optimizer.pt" in names and "trainer_state.json" in names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json", "training_args.bin"}
    art = gpart.read_artifact(ckpt / "adapter.gpart")
    assert torch.equal(art.theta, gpart.theta(trainer.model).detach().cpu())
    assert art.theta.abs().sum() > 0  # it trained
    assert art.meta["task"]["type"] == "causal_lm" and art.meta["d"] == 64 and art.meta["seed"] == 3


def test_resume_reaches_the_theta_of_an_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", 4)
    full.train()
    part = make_trainer(tmp_path / "part", 4, stop_at=2)
    part.train()  # stops after step 2, checkpoint-2 written
    assert not torch.equal(gpart.theta(part.model), gpart.theta(full.model))
    resumed = make_trainer(tmp_path / "part", 4)  # a fresh process's model: θ = 0 until the checkpoint loads
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    assert torch.equal(gpart.theta(resumed.model), gpart.theta(full.model))


@pytest.mark.slow  # gpart inspect, merge and eval end to end
def test_save_model_writes_an_adapter_that_eval_merge_and_inspect_read(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from gpart_cli.commands.app import app

    model = gpart.apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), gpart.GPartConfig(**CFG))
    args = TrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=0.05,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = gpart.trainer(Trainer)(model=model, args=args, train_dataset=Rows(),
                                     processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    adapter = tmp_path / "final" / "adapter.gpart"
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(adapter), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["d"] == 64
    res = runner.invoke(app, ["merge", str(tiny_llama_dir), str(adapter), "-o", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = gpart.merge(trainer.model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged.state_dict()[name], expected.state_dict()[name].cpu())
    rows = tmp_path / "mawps.json"
    rows.write_text(json.dumps([{"original_text": "What is 2 plus 3?", "ans": 5}]))
    res = runner.invoke(app, ["eval", "--task", "mawps", "--adapter", str(tmp_path / "final"), "--model",
                              str(tiny_llama_dir), "--data", str(rows), "--max-new-tokens", "4",
                              "--output", str(tmp_path / "scores.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "scores.json").read_text())["scores"]["n"] == 1


def test_gradient_checkpointing_and_bf16_autocast_train_theta(tmp_path):
    plain = make_trainer(tmp_path / "a", 1, save_strategy="no")
    plain.train()
    checkpointed = make_trainer(tmp_path / "b", 1, save_strategy="no", gradient_checkpointing=True)
    checkpointed.train()
    # Recomputing the activations gives the same gradient, so the same first step.
    torch.testing.assert_close(gpart.theta(checkpointed.model), gpart.theta(plain.model), rtol=1e-5, atol=1e-7)
    bf16 = make_trainer(tmp_path / "c", 1, save_strategy="no", bf16=True)
    bf16.train()
    theta = gpart.theta(bf16.model)
    assert theta.dtype == torch.float32 and theta.abs().sum() > 0
    # Adam's first step moves every entry with a nonzero gradient by about lr in the gradient's sign: bf16's
    # rounding changes few signs.
    agree = (torch.sign(theta) == torch.sign(gpart.theta(plain.model))).float().mean()
    assert agree > 0.9


def test_sft_trainer_trains_and_saves_the_adapter(tmp_path, tiny_llama_dir):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = gpart.apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), gpart.GPartConfig(**CFG))
    data = Dataset.from_dict({"prompt": ["2 + 3 =", "4 + 4 ="] * 4, "completion": [" 5", " 8"] * 4})
    args = trl.SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.05,
                         report_to="none", use_cpu=True, disable_tqdm=True, save_steps=2)
    trainer = gpart.trainer(trl.SFTTrainer)(model=model, args=args, train_dataset=data,
                                            processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir))
    trainer.train()
    art = gpart.read_artifact(tmp_path / "checkpoint-2" / "adapter.gpart")
    assert art.theta.abs().sum() > 0
    assert torch.equal(art.theta, gpart.theta(trainer.model).detach().cpu())
    assert not (tmp_path / "checkpoint-2" / "model.safetensors").exists()


def test_load_best_model_at_end_restores_the_best_checkpoints_theta(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = gpart.apply(tiny_llama(), gpart.GPartConfig(**CFG))
    # "Best" = highest eval loss: the loss falls, so the best checkpoint is an early one, not the model in memory.
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=0.05,
                             eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                             metric_for_best_model="loss", greater_is_better=True, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = gpart.trainer(Trainer)(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4"), best
    assert torch.equal(gpart.theta(model), gpart.read_artifact(f"{best}/adapter.gpart").theta)
