"""SFT splits (docs/data.md): rows read (`data.format`), rendered (`data.chat_template`), tokenized with the loss on
the response only, a dev split carved from train; evaluation is generation-based and reads its own data."""

from __future__ import annotations

from ..errors import GpartError
from .chat import PackingCollator, required_columns, resolve_rendering, to_conversations
from .sft import SFTCollator, converter
from .sources import load_rows_with_source, require_columns
from .splits import Splits, carve_dev


def _tokenized_dataset(rows, data, rendering, tokenizer, source: str, what: str):
    """A `datasets.Dataset` of input_ids/labels; GpartError if every example was truncated away."""
    import datasets

    examples = rendering.tokenize(to_conversations(rows, data, source), tokenizer, data.max_length)
    if not examples:
        raise GpartError(f"every {what} example of {source} was truncated away: the prompt alone is at least "
                         f"data.max_length = {data.max_length} tokens; raise data.max_length")
    return datasets.Dataset.from_list(examples)


def build_sft_splits(data, tokenizer, seed: int) -> Splits:
    """Train and dev (carved from train, seeded, before tokenization) for SFT; eval is generation-based.

    `data.format` says how rows read and `data.chat_template` how they render (`chat`); `data.packing` packs the
    training batches into one row each (the dev loss stays padded).
    """
    rendering = resolve_rendering(data, tokenizer)  # an unknown template fails before any data is read
    columns = required_columns(data) or converter(data)[1]  # so does an unknown task
    rows, source = load_rows_with_source(data.train_files, data.path, data.config, data.train_split,
                                         data.max_train_samples, seed, "training data", data.revision)
    require_columns(rows, columns, source)  # fail before carving and tokenizing
    train, dev = carve_dev(rows, data.dev_fraction, seed, data.dev_samples)
    return Splits(train=_tokenized_dataset(train, data, rendering, tokenizer, source, "training"),
                  dev=None if dev is None else _tokenized_dataset(dev, data, rendering, tokenizer, source, "dev"),
                  eval=None, collate=SFTCollator(tokenizer.pad_token_id),
                  train_collate=PackingCollator() if data.packing else None)
