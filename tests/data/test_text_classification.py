"""Your own text classification data (data/text_classification.py): labels inferred and recorded, train and eval."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from gpart_cli.commands.app import app
from gpart_cli.data.text_classification import encode_labels, infer_labels
from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import from_dict
from gpart_cli.train.run import run

WORDS = {"billing": ["invoice", "charge", "refund", "payment"], "shipping": ["parcel", "delivery", "courier", "late"],
         "login": ["password", "account", "locked", "reset"]}


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["message", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def support_rows(n: int, offset: int = 0) -> list[dict]:
    topics = sorted(WORDS)
    return [{"message": f"my {WORDS[t][i % 4]} and {WORDS[t][(i + 1) % 4]} question number {i}", "topic": t}
            for i in range(offset, offset + n) for t in [topics[i % 3]]]


def test_labels_are_inferred_in_a_stable_order():
    assert infer_labels([2, 0, 1, 0], None, "f", "label") == ["0", "1", "2"]
    assert infer_labels([1.0, 0.0], None, "f", "label") == ["0", "1"]  # csv readers give integral floats
    assert infer_labels(["spam", "ham", "spam"], None, "f", "label") == ["ham", "spam"]
    assert infer_labels(["spam", "ham"], ["spam", "ham"], "f", "label") == ["spam", "ham"]
    assert encode_labels(["spam", "ham", "spam"], ["ham", "spam"], "f", "label") == [1, 0, 1]
    assert encode_labels([1, "0"], ["0", "1"], "f", "label") == [1, 0]
    with pytest.raises(GpartError, match="label 'x' in column 'label'.*all integers 0..k-1 or all strings"):
        infer_labels([0, "x"], None, "f", "label")
    with pytest.raises(GpartError, match="label -1 in column 'label' is negative"):
        infer_labels([0, -1], None, "f", "label")
    with pytest.raises(GpartError, match="label 'eggs' in column 'label' is not one of the 2 classes the run knows "
                                         r"\(ham, spam\)"):
        encode_labels(["eggs"], ["ham", "spam"], "eval.csv", "label")


@pytest.mark.slow
def test_train_and_eval_on_your_own_csv(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", support_rows(36))
    val = write_csv(tmp_path / "val.csv", support_rows(12, offset=100))
    recipe = from_dict({
        "model": {"name_or_path": str(tiny_bert_dir)},
        "method": {"name": "gpart", "d": 64, "target_modules": ["query", "value"]},
        "data": {"family": "text_classification", "task": "support", "train_files": [str(train)],
                 "eval_files": [str(val)], "text_columns": ["message"], "label_column": "topic", "max_length": 24,
                 "dev_fraction": 0.25},
        "train": {"max_steps": 3, "batch_size": 8, "eval_before": False, "lr_theta": 0.05, "lr_head": 0.05},
        "name": "support"})
    results = run(recipe, tmp_path / "run")
    assert results["task"] == "text_classification/support"
    assert set(results["after"]) == {"accuracy", "f1_macro"}
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 12
    from gpart_cli.core.artifact import read_artifact

    task = read_artifact(tmp_path / "run" / "adapter.gpart").meta["task"]
    assert (task["num_labels"], task["labels"]) == (3, ["billing", "login", "shipping"])  # sorted, recorded
    # gpart eval of the run scores it on its own data, through the recorded class order
    res = CliRunner().invoke(app, ["eval", "--task", "text_classification/support", "--adapter",
                                   str(tmp_path / "run"), "--model", str(tiny_bert_dir), "--output",
                                   str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev.json").read_text())["scores"] == results["after"]
    # an eval file with a class training never saw is an error naming it
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"message": "hello", "topic": "returns"}])
    res = CliRunner().invoke(app, ["eval", "--task", "text_classification/support", "--adapter",
                                   str(tmp_path / "run"), "--model", str(tiny_bert_dir), "--data", str(bad),
                                   "--output", str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "label 'returns' in column 'topic' is not one of the 3 classes" in res.output
