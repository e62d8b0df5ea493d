"""Read one split of rows from the hub or from local files, through the same `datasets` code path."""

from __future__ import annotations

from pathlib import Path

from ..errors import GpartError, first_line

# `datasets` builder names per file suffix; .jsonl and .json both load with the json builder.
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}


def _builder(files: list[str]) -> tuple[str, dict]:
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise GpartError(f"data files {files} should all be one of {', '.join(sorted(_BUILDERS))}")
    suffix = next(iter(suffixes))
    return _BUILDERS[suffix], ({"delimiter": "\t"} if suffix == ".tsv" else {})


def load_rows(files: list[str] | None, path: str | None, config: str | None, split: str,
              max_samples: int | None = None, seed: int = 0, what: str = "data"):
    """A `datasets.Dataset` of one split: local `files` if given, else hub dataset `path`/`config`.

    `max_samples` keeps a seeded random subset (the same rows for the same seed).
    """
    import datasets

    datasets.disable_progress_bars()
    if files:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise GpartError(f"{what} file {missing[0]} does not exist; fix the path in the recipe "
                             f"(relative paths are relative to the directory you run gpart from)")
        empty = [f for f in files if Path(f).stat().st_size == 0]
        if empty:
            raise GpartError(f"{what} file {empty[0]} is empty; point the recipe at a file with rows")
        builder, extra = _builder(files)
        try:
            rows = datasets.load_dataset(builder, data_files={"rows": list(files)}, split="rows", **extra)
        except Exception as e:  # malformed JSON/CSV surfaces as several exception types
            raise GpartError(f"could not read {what} files {files}: {first_line(e)}") from None
        source = ", ".join(files)
    elif path:
        try:
            rows = datasets.load_dataset(path, config, split=split)
        except Exception as e:
            raise GpartError(f"could not load {what} {path!r} (config {config!r}, split {split!r}): "
                             f"{first_line(e)}. Offline? Point the recipe's files at local copies") from None
        source = f"{path}/{config or ''}:{split}"
    else:
        raise GpartError(f"no {what} source: set the recipe's files (local) or data.path (hub dataset id)")
    if len(rows) == 0:
        raise GpartError(f"{what} split {source} is empty; check the file or split name")
    if max_samples is not None and max_samples < len(rows):
        rows = rows.shuffle(seed=seed).select(range(max_samples))
    return rows


def require_columns(rows, columns: list[str], source: str) -> None:
    """Raise `GpartError` naming the missing columns and the ones found."""
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise GpartError(f"{source} lacks column(s) {', '.join(missing)}; found {', '.join(rows.column_names)}. "
                         f"Set data.text_columns / data.label_column / data.query_column to the right names")
