"""Classification and regression metrics for GLUE, vision and exact-match tasks (docs/design.md §7).

Metric names and definitions follow the HF `evaluate` GLUE metric so reported numbers are comparable.
Every value is a plain Python float; degenerate inputs (a constant prediction, a constant regression
output) score 0.0 rather than NaN, because NaN silently breaks "best checkpoint" comparisons.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import GpartError

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "mnli", "wnli")

# The single metric used to pick the best checkpoint on each GLUE task (higher is better for all).
GLUE_MAIN_METRIC: dict[str, str] = {
    task: {"cola": "matthews_correlation", "stsb": "pearson"}.get(task, "accuracy") for task in GLUE_TASKS
}


def _as_arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as flat numpy arrays of equal length (lists, tuples, numpy or CPU tensors)."""
    preds = np.asarray(predictions).reshape(-1)
    refs = np.asarray(references).reshape(-1)
    if preds.shape != refs.shape:
        raise GpartError(
            f"metrics got {preds.size} predictions but {refs.size} references; "
            "they must be the same length (one prediction per evaluation example)"
        )
    return preds, refs


def accuracy(predictions, references) -> float:
    """Fraction of predictions equal to their reference (top-1 / exact match); 0.0 when empty."""
    preds, refs = _as_arrays(predictions, references)
    return float(np.mean(preds == refs)) if preds.size else 0.0


def exact_match_rate(flags) -> float:
    """Mean of a sequence of booleans; 0.0 for an empty sequence."""
    values = [bool(f) for f in flags]
    return sum(values) / len(values) if values else 0.0


def _f1(preds: np.ndarray, refs: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1); 0.0 when there are no true positives."""
    from sklearn.metrics import f1_score

    return float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0.0))


def _matthews(preds: np.ndarray, refs: np.ndarray) -> float:
    """Matthews correlation; 0.0 when undefined (constant predictions or references)."""
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn may warn on a 0/0 it already maps to 0
        value = float(matthews_corrcoef(refs, preds))
    return 0.0 if np.isnan(value) else value


def _is_constant(x: np.ndarray) -> bool:
    """True when every element is equal, so a correlation with it is undefined."""
    return x.size < 2 or bool(np.all(x == x[0]))


def _correlations(preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation for STS-B.

    A constant input makes both undefined (scipy returns NaN and warns). A regression head that has
    collapsed to one value is a bad model, so it scores 0.0: NaN would compare False against every
    score and break best-checkpoint selection (or, worse, be kept as "best").
    """
    from scipy.stats import pearsonr, spearmanr

    preds, refs = preds.astype(np.float64), refs.astype(np.float64)
    if _is_constant(preds) or _is_constant(refs):
        return {"pearson": 0.0, "spearmanr": 0.0}
    pearson = float(pearsonr(preds, refs)[0])
    spearman = float(spearmanr(preds, refs)[0])
    return {
        "pearson": 0.0 if np.isnan(pearson) else pearson,
        "spearmanr": 0.0 if np.isnan(spearman) else spearman,
    }


def glue_metrics(task: str, predictions, references) -> dict[str, float]:
    """The official GLUE metrics of `task` for label predictions (or scores, for stsb)."""
    if task not in GLUE_TASKS:
        raise GpartError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    preds, refs = _as_arrays(predictions, references)
    if task == "stsb":
        return _correlations(preds, refs)
    if task == "cola":
        # Nothing evaluated scores as worst rather than crashing inside sklearn.
        return {"matthews_correlation": _matthews(preds, refs) if preds.size else 0.0}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy(preds, refs), "f1": _f1(preds, refs) if preds.size else 0.0}
    return {"accuracy": accuracy(preds, refs)}


def macro_f1(predictions, references) -> float:
    """F1 averaged over the classes that occur in references or predictions (sklearn's macro average)."""
    from sklearn.metrics import f1_score

    preds, refs = _as_arrays(predictions, references)
    return float(f1_score(refs, preds, average="macro", zero_division=0.0)) if preds.size else 0.0
