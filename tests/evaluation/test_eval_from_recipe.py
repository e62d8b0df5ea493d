"""`gpart eval --adapter RUN` scores the data the run's recipe names: dataset, split, columns, max length,
image transform; not the task name as a hub id with split `validation` and columns image/label."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train.run import run

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture
def cifar_like(monkeypatch):
    """A hub dataset shaped like uoft-cs/cifar100: columns img / fine_label, splits train and test, no validation."""
    import datasets
    import numpy as np
    from PIL import Image

    real = datasets.load_dataset
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(names=["ant", "bee", "cow"]),
                                  "coarse_label": datasets.Value("int64")})

    def split(n):
        labels = [i % 3 for i in range(n)]
        images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) // (1 + lab)) for lab in labels]
        return datasets.Dataset.from_dict({"img": images, "fine_label": labels, "coarse_label": [0] * n}, features)

    served = {"train": split(48), "test": split(24)}

    def load_dataset(path, name=None, *args, split=None, revision=None, **kwargs):
        if path != "someone/cifar-like":
            return real(path, name, *args, split=split, **kwargs)
        if split not in served:
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')
        return served[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served


def test_vision_eval_reads_dataset_split_and_columns_from_the_run(cifar_like, tmp_path):
    recipe = from_dict({
        "model": {"config": {"model_type": "vit", "image_size": 16, "patch_size": 4, "num_channels": 3,
                             "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                             "intermediate_size": 64}},
        "method": {"name": "full"},
        "data": {"family": "vision", "task": "cifar_like", "path": "someone/cifar-like", "eval_split": "test",
                 "image_column": "img", "label_column": "fine_label", "dev_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 8, "lr_theta": 1e-3, "eval_before": False}, "name": "c"})
    results = run(recipe, tmp_path / "run")
    res = runner.invoke(app, ["eval", "--task", "vision/cifar_like", "--adapter", str(tmp_path / "run"),
                              "--output", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "ev.json").read_text())
    assert doc["scores"] == results["after"]
    assert len((tmp_path / "ev.predictions.jsonl").read_text().splitlines()) == 24  # the test split
    res = runner.invoke(app, ["eval", "--task", "vision/cifar_like", "--adapter", str(tmp_path / "run"),
                              "--split", "train", "--output", str(tmp_path / "tr.json")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "tr.predictions.jsonl").read_text().splitlines()) == 48


def test_glue_eval_reads_files_and_max_length_from_the_run(tiny_bert_dir, sst2_files, tmp_path, monkeypatch):
    import gpart_cli.data.glue as glue

    recipe = from_dict({
        "model": {"name_or_path": str(tiny_bert_dir)},
        "method": {"name": "gpart", "d": 64, "target_modules": ["query", "value"]},
        "data": {"family": "glue", "task": "sst2", "train_files": [str(sst2_files[0])],
                 "eval_files": [str(sst2_files[1])], "max_length": 12, "dev_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 8, "eval_before": False}, "name": "g"})
    results = run(recipe, tmp_path / "run")
    lengths = []
    tokenize = glue.tokenize_rows
    monkeypatch.setattr(glue, "tokenize_rows", lambda *args: lengths.append(args[-1]) or tokenize(*args))
    # No --data: the run's eval files and max length are used, offline.
    res = runner.invoke(app, ["eval", "--task", "glue/sst2", "--adapter", str(tmp_path / "run"), "--model",
                              str(tiny_bert_dir), "--output", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev.json").read_text())["scores"] == results["after"] and lengths == [12]
    preds = [json.loads(x) for x in (tmp_path / "ev.predictions.jsonl").read_text().splitlines()]
    run_preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert preds == run_preds
