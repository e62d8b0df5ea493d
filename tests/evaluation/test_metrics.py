"""GLUE / vision / exact-match metrics (docs/design.md §7) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpart_cli.errors import GpartError
from gpart_cli.evaluation.metrics import GLUE_MAIN_METRIC, accuracy, exact_match_rate, glue_metrics

PREDS = [1, 1, 1, 0, 0, 1, 0, 0, 1, 1]
REFS = [1, 1, 0, 0, 0, 1, 1, 0, 1, 0]
# Confusion matrix by hand: TP=4 (idx 0,1,5,8), FP=2 (idx 2,9), FN=1 (idx 6), TN=3 (idx 3,4,7).
TP, FP, FN, TN = 4, 2, 1, 3


def test_accuracy():
    assert accuracy(PREDS, REFS) == pytest.approx((TP + TN) / 10)
    assert accuracy([], []) == 0.0
    assert accuracy(np.array([2, 0, 1]), np.array([2, 1, 1])) == pytest.approx(2 / 3)
    assert isinstance(accuracy([1], [1]), float)


def test_accuracy_length_mismatch():
    with pytest.raises(GpartError, match="same length"):
        accuracy([1, 0], [1])


def test_exact_match_rate():
    assert exact_match_rate([True, False, True, True]) == 0.75
    assert exact_match_rate([]) == 0.0
    assert exact_match_rate(x == 1 for x in [1, 2]) == 0.5  # any iterable


def test_cola_matthews_matches_formula():
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    out = glue_metrics("cola", PREDS, REFS)
    assert set(out) == {"matthews_correlation"}
    assert out["matthews_correlation"] == pytest.approx(expected)  # = 10 / sqrt(720)
    assert type(out["matthews_correlation"]) is float


def test_cola_constant_prediction_is_zero():
    assert glue_metrics("cola", [1] * 6, [1, 0, 1, 0, 1, 1]) == {"matthews_correlation": 0.0}
    assert glue_metrics("cola", [], []) == {"matthews_correlation": 0.0}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_tasks(task):
    precision, recall = TP / (TP + FP), TP / (TP + FN)
    out = glue_metrics(task, PREDS, REFS)
    assert set(out) == {"accuracy", "f1"}
    assert out["accuracy"] == pytest.approx(0.7)
    assert out["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # = 8/11


def test_f1_without_positive_predictions_is_zero():
    assert glue_metrics("mrpc", [0, 0, 0], [1, 0, 1]) == {"accuracy": pytest.approx(1 / 3), "f1": 0.0}


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "mnli", "wnli"])
def test_accuracy_only_tasks(task):
    assert glue_metrics(task, PREDS, REFS) == {"accuracy": pytest.approx(0.7)}


def test_mnli_three_classes():
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_stsb_pearson_and_spearman():
    preds = [1.0, 2.0, 3.0, 4.0]
    refs = [1.0, 3.0, 2.0, 5.0]
    # Pearson by hand: means 2.5 and 2.75; sum(dx*dy) = 5.5; sum(dx^2) = 5; sum(dy^2) = 8.75.
    pearson = 5.5 / math.sqrt(5 * 8.75)
    # Spearman: ranks [1,2,3,4] vs [1,3,2,4]; d^2 sum = 2; rho = 1 - 6*2 / (4*(16-1)) = 0.8.
    out = glue_metrics("stsb", preds, refs)
    assert set(out) == {"pearson", "spearmanr"}
    assert out["pearson"] == pytest.approx(pearson)
    assert out["spearmanr"] == pytest.approx(0.8)
    assert all(type(v) is float for v in out.values())


def test_stsb_perfect_and_inverse():
    assert glue_metrics("stsb", [1, 2, 3], [2, 4, 6])["pearson"] == pytest.approx(1.0)
    assert glue_metrics("stsb", [1, 2, 3], [3, 2, 1])["spearmanr"] == pytest.approx(-1.0)


def test_stsb_constant_prediction_is_zero_not_nan():
    # A collapsed regression head must score as bad (0.0), not NaN that breaks checkpoint selection.
    out = glue_metrics("stsb", [2.5, 2.5, 2.5, 2.5], [1.0, 3.0, 2.0, 5.0])
    assert out == {"pearson": 0.0, "spearmanr": 0.0}
    assert glue_metrics("stsb", [1.0], [2.0]) == {"pearson": 0.0, "spearmanr": 0.0}
    assert glue_metrics("stsb", [], []) == {"pearson": 0.0, "spearmanr": 0.0}


def test_accepts_numpy_and_torch():
    torch = pytest.importorskip("torch")
    out = glue_metrics("sst2", torch.tensor(PREDS), np.array(REFS))
    assert out == {"accuracy": pytest.approx(0.7)}


def test_unknown_task_names_valid_ones():
    with pytest.raises(GpartError) as err:
        glue_metrics("sst-2", [1], [1])
    message = str(err.value)
    assert "sst-2" in message
    for task in ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "mnli", "wnli"):
        assert task in message


def test_main_metric_table():
    assert GLUE_MAIN_METRIC["cola"] == "matthews_correlation"
    assert GLUE_MAIN_METRIC["stsb"] == "pearson"
    for task in ("sst2", "mrpc", "qqp", "qnli", "rte", "mnli", "wnli"):
        assert GLUE_MAIN_METRIC[task] == "accuracy"
    for task, metric in GLUE_MAIN_METRIC.items():  # the main metric is always among those returned
        assert metric in glue_metrics(task, PREDS, REFS)
