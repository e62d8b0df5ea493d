"""Text classification on your own data: the GLUE path without GLUE's task table.

Rows come from local jsonl/json/csv/tsv/parquet files or a hub dataset (`data.path`/`config`), with one or two text
columns (`data.text_columns`, default [text]) and a label column (`data.label_column`). The classes are inferred
from the training rows:

- integer labels 0..k-1 are ids as they are (num_labels = the largest + 1), named "0".."k-1";
- string labels are ids in sorted order;
- `data.labels` fixes the names and their order instead (integer labels then index it).

The names, in id order, are recorded in the run (task.labels, the model's id2label); evaluation maps its rows through
that record, so an eval file with a class that training never saw is an error, not a silent mislabel.
"""

from __future__ import annotations

from ..errors import GpartError
from .sources import load_rows_with_source, require_columns
from .splits import Splits, carve_dev


def _kind(value) -> str:
    """"int" or "str" for a usable label (integral floats, as csv readers give, count as int); else "bad"."""
    if isinstance(value, bool):
        return "bad"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "int"
    return "str" if isinstance(value, str) else "bad"


def infer_labels(values: list, declared: list | None, source: str, column: str) -> list[str]:
    """Class names in id order: `declared`, else "0".."k-1" for integer labels or the sorted strings."""
    kinds = {_kind(v) for v in values}
    bad = next((v for v in values if _kind(v) == "bad"), None)
    if bad is None and len(kinds) > 1:
        bad = next(v for v in values if _kind(v) != _kind(values[0]))  # the first that breaks the pattern
    if bad is not None:
        raise GpartError(f"{source}: label {bad!r} in column {column!r}: labels should be all integers 0..k-1 or "
                         f"all strings (class names); fix the column or set data.label_column")
    if declared:
        return [str(name) for name in declared]
    if kinds == {"int"}:
        low, high = min(int(v) for v in values), max(int(v) for v in values)
        if low < 0:
            raise GpartError(f"{source}: label {low} in column {column!r} is negative; integer labels are class ids "
                             f"0..k-1 (test splits often carry -1: they cannot be used for training)")
        return [str(i) for i in range(high + 1)]
    return sorted(set(values))


def encode_labels(values: list, names: list[str], source: str, column: str) -> list[int]:
    """Class ids of `values`: integers index `names`, strings are looked up in it."""
    ids = {name: i for i, name in enumerate(names)}
    out = []
    for v in values:
        kind = _kind(v)
        i = int(v) if kind == "int" and 0 <= int(v) < len(names) else ids.get(v) if kind == "str" else None
        if i is None:
            raise GpartError(f"{source}: label {v!r} in column {column!r} is not one of the {len(names)} classes "
                             f"the run knows ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); "
                             f"add it to the training data or to data.labels")
        out.append(i)
    return out


def text_columns(data) -> list[str]:
    columns = list(data.text_columns or ["text"])
    if not 1 <= len(columns) <= 2:
        raise GpartError(f"recipe field data.text_columns = {columns!r}: give one text column, or two for sentence "
                         f"pairs")
    return columns


def load_split(data, files, split: str, max_samples, seed: int, what: str):
    """(rows, how messages name them) of one split, with the text and label columns checked."""
    rows, source = load_rows_with_source(files, data.path, data.config, split, max_samples, seed, what, data.revision)
    require_columns(rows, text_columns(data) + [data.label_column], source)
    return rows, source


def tokenize(rows, data, names: list[str], tokenizer, source: str):
    """A dataset of input_ids / attention_mask / labels (class ids by `names`)."""
    columns = text_columns(data)
    labels = encode_labels(rows[data.label_column], names, source, data.label_column)
    rows = rows.add_column("_label_id", labels)

    def encode(batch):
        enc = tokenizer(*[[str(t) for t in batch[c]] for c in columns], truncation=True, max_length=data.max_length)
        enc["labels"] = batch["_label_id"]
        return enc

    return rows.map(encode, batched=True, remove_columns=rows.column_names)


def build_text_classification_splits(data, tokenizer, seed: int) -> Splits:
    """Train (minus dev), dev (carved from train) and eval (data.eval_files, or the hub's data.eval_split)."""
    from transformers import DataCollatorWithPadding

    train, source = load_split(data, data.train_files, data.train_split, data.max_train_samples, seed, "training data")
    names = infer_labels(train[data.label_column], data.labels, source, data.label_column)
    if len(names) < 2:
        raise GpartError(f"{source}: column {data.label_column!r} holds one class ({names[0]}); classification needs "
                         f"at least two")
    train, dev = carve_dev(train, data.dev_fraction, seed, data.dev_samples)
    evaluation = None
    if data.eval_files or data.path:
        rows, eval_source = load_split(data, data.eval_files, data.eval_split, data.max_eval_samples, seed, "eval data")
        evaluation = tokenize(rows, data, names, tokenizer, eval_source)
    return Splits(train=tokenize(train, data, names, tokenizer, source),
                  dev=None if dev is None else tokenize(dev, data, names, tokenizer, source),
                  eval=evaluation, collate=DataCollatorWithPadding(tokenizer), labels=names, num_labels=len(names))


def eval_dataset(data, tokenizer, names: list[str], limit: int | None):
    """(dataset, collate) of the eval split for `gpart eval`, labels mapped through the run's class `names`."""
    from transformers import DataCollatorWithPadding

    rows, source = load_split(data, data.eval_files, data.eval_split, None, 0, "eval data")
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    return tokenize(rows, data, names, tokenizer, source), DataCollatorWithPadding(tokenizer)
