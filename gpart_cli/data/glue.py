"""GLUE text classification data (docs/design.md §1, §6-7): columns, labels, tokenization, dev carve-out.

Paper protocol: checkpoints are chosen on a dev split carved from train (seeded), and the score is
reported on the official validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GpartError
from .sources import load_rows_with_source, require_columns
from .splits import Splits, carve_dev

HUB_PATH = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    text_columns: tuple[str, ...]
    labels: tuple[str, ...]          # empty: regression (STS-B)
    eval_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


GLUE_TASKS = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable")),
    "sst2": GlueTask(("sentence",), ("negative", "positive")),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate")),
    "stsb": GlueTask(("sentence1", "sentence2"), ()),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "validation_matched"),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment")),
}


def glue_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise GpartError(f"unknown GLUE task {name!r}; use one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[name]


def check_labels(rows, task: GlueTask, label_column: str, source: str) -> None:
    """Classification labels must be integers in [0, num_labels); regression labels numbers."""
    values = rows[label_column]
    if not task.labels:
        bad = next((v for v in values if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
        if bad is not None:
            raise GpartError(f"{source}: regression label {bad!r} in column {label_column!r} is not a number")
        return
    bad = next((v for v in values if not isinstance(v, int) or not 0 <= v < task.num_labels), None)
    if bad is not None:
        raise GpartError(f"{source}: label {bad!r} in column {label_column!r} is out of range for num_labels = "
                         f"{task.num_labels} (expected 0..{task.num_labels - 1}; test splits have label -1 and "
                         f"cannot be used for training or scoring)")


def tokenize_rows(rows, task: GlueTask, columns: list[str], label_column: str, tokenizer, max_length: int):
    """Tokenized dataset with input_ids/attention_mask/labels only."""
    def encode(batch):
        enc = tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_length)
        enc["labels"] = [float(v) for v in batch[label_column]] if not task.labels else batch[label_column]
        return enc

    return rows.map(encode, batched=True, remove_columns=rows.column_names)


def load_glue_rows(data, split_files, split: str, max_samples, seed: int, what: str):
    """Rows and text columns of one split: local files, or (also when the files are absent) the hub's GLUE copy."""
    task = glue_task(data.task)
    columns = list(data.text_columns or task.text_columns)
    rows, source = load_rows_with_source(split_files, data.path or HUB_PATH, data.config or data.task, split,
                                         max_samples, seed, what, data.revision)
    require_columns(rows, columns + [data.label_column], source)
    check_labels(rows, task, data.label_column, source)
    return rows, columns


def build_glue_splits(data, tokenizer, seed: int) -> Splits:
    """Train (minus dev), dev (carved from train), and eval (validation) for one GLUE task."""
    from transformers import DataCollatorWithPadding

    task = glue_task(data.task)
    train, columns = load_glue_rows(data, data.train_files, data.train_split, data.max_train_samples, seed,
                                    "training data")
    train, dev = carve_dev(train, data.dev_fraction, seed, data.dev_samples)
    eval_split = data.eval_split if data.eval_split != "validation" else task.eval_split
    evaluation, _ = load_glue_rows(data, data.eval_files, eval_split, data.max_eval_samples, seed, "eval data")

    def encode(rows):
        return None if rows is None else tokenize_rows(rows, task, columns, data.label_column, tokenizer,
                                                        data.max_length)

    return Splits(train=encode(train), dev=encode(dev), eval=encode(evaluation),
                  collate=DataCollatorWithPadding(tokenizer), labels=list(task.labels) or None,
                  num_labels=task.num_labels)
