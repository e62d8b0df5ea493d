"""Scoring classification and regression heads (GLUE, vision) on a tokenized/transformed split."""

from __future__ import annotations

import torch

from .metrics import GLUE_MAIN_METRIC, accuracy, glue_metrics, macro_f1


@torch.no_grad()
def predict(model, dataset, collate, batch_size: int, device, autocast_dtype=None) -> tuple[list, list]:
    """(predictions, references) over `dataset`: argmax class, or the scalar for a 1-output regression head."""
    was_training = model.training
    model.eval()
    preds, refs = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        labels = batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch).logits.float()
        preds += (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).tolist()
        refs += labels.tolist()
    model.train(was_training)
    return preds, refs


def score(family: str, task: str, preds: list, refs: list) -> dict[str, float]:
    """GLUE metrics per task (docs/design.md §7), accuracy and macro F1 for your own text classes (text_classification),
    top-1 accuracy for vision."""
    if family == "glue":
        return glue_metrics(task, preds, refs)
    if family == "text_classification":
        return {"accuracy": accuracy(preds, refs), "f1_macro": macro_f1(preds, refs)}
    return {"accuracy": accuracy(preds, refs)}


def main_metric(family: str, task: str) -> str:
    """The metric checkpoints are chosen on (higher is better)."""
    return GLUE_MAIN_METRIC[task] if family == "glue" else "accuracy"
