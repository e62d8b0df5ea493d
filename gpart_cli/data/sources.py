"""Read one split of rows from local files or the hub, through the same `datasets` code path.

Local files win when they are there. A recipe that names local files *and* a hub dataset (`data.path`/`config`) runs
on any machine: where the files are absent (a fresh clone without `../shared`), the same rows come from the hub,
and gpart says which source it used. With neither reachable the error names both.
"""

from __future__ import annotations

import contextlib
import contextvars
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


def hub_name(path: str, config: str | None, split: str, revision: str | None = None) -> str:
    """How messages name a hub split: `nyu-mll/glue (config sst2, split train)`."""
    parts = [f"config {config}"] if config else []
    parts += [f"split {split}"] + ([f"revision {revision}"] if revision else [])
    return f"{path} ({', '.join(parts)})"


def missing_files(files, exists=Path.is_file) -> list[str]:
    """The named files (or folders, with `exists=Path.exists`) that are not there."""
    return [str(f) for f in files or [] if not exists(Path(f))]


def notice(message: str) -> None:
    """One line on stderr about where data came from (the CLI's progress display stays on stdout's side)."""
    from rich.console import Console

    Console(stderr=True).print(f"[cyan]data:[/] {message}", highlight=False, soft_wrap=True)


def missing_error(what: str, missing: str, hub: str | None = None, why: str | None = None) -> GpartError:
    """The error for an absent local file, naming the hub source too when there is one."""
    if hub is None:
        return GpartError(f"{what} file {missing} does not exist; fix the path in the recipe (relative paths are "
                          f"relative to the directory you run gpart from), or set data.path/data.config to a hub "
                          f"dataset with the same rows")
    return GpartError(f"{what}: local file {missing} does not exist, and the hub dataset {hub} could not be loaded "
                      f"({why}). Put the file there, or run where the hub is reachable (HF_HUB_OFFLINE unset)")


def _hub_split(path: str, config: str | None, split: str, revision: str | None):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(path, config, split=split, revision=revision)


# How the user points gpart at local copies of the data, for the offline hint: a training run's recipe names its
# files; `gpart eval` has no recipe but --data (`local_copies_hint`).
_LOCAL_COPIES = contextvars.ContextVar("local_copies", default="Point the recipe's files at local copies")


@contextlib.contextmanager
def local_copies_hint(text: str):
    """Within this block, a hub dataset that cannot be loaded says `text` as the way to local copies."""
    token = _LOCAL_COPIES.set(text)
    try:
        yield
    finally:
        _LOCAL_COPIES.reset(token)


def load_hub(path: str, config: str | None, split: str, what: str, revision: str | None = None):
    """One split of a hub dataset; GpartError naming it (and the offline hint) when `datasets` cannot load it."""
    try:
        return _hub_split(path, config, split, revision)
    except Exception as e:  # network, missing split/config and script-only repos surface as many exception types
        raise GpartError(f"could not load {what} {hub_name(path, config, split, revision)}: {first_line(e)}. "
                         f"Offline? {_LOCAL_COPIES.get()}") from None


def _load_local(files: list[str], what: str):
    import datasets

    datasets.disable_progress_bars()
    empty = [f for f in files if Path(f).stat().st_size == 0]
    if empty:
        raise GpartError(f"{what} file {empty[0]} is empty; point the recipe at a file with rows")
    builder, extra = _builder(files)
    try:
        return datasets.load_dataset(builder, data_files={"rows": list(files)}, split="rows", **extra)
    except Exception as e:  # malformed JSON/CSV surfaces as several exception types
        raise GpartError(f"could not read {what} files {files}: {first_line(e)}") from None


def fallback_to_hub(missing: str, path: str, config: str | None, split: str, what: str, revision: str | None = None):
    """The hub split that stands in for an absent local file, announced; both sources named if it fails too."""
    hub = hub_name(path, config, split, revision)
    try:
        rows = _hub_split(path, config, split, revision)
    except Exception as e:  # as in load_hub: whatever `datasets` raises, the message names both sources
        raise missing_error(what, missing, hub, first_line(e)) from None
    notice(f"{what}: {missing} is not here; using the hub dataset {hub} instead")
    return rows


def load_rows_with_source(files: list[str] | None, path: str | None, config: str | None, split: str,
                          max_samples: int | None = None, seed: int = 0, what: str = "data",
                          revision: str | None = None):
    """(`datasets.Dataset` of one split, how messages name its source).

    Local `files` if they are all there; absent ones are replaced by hub dataset `path`/`config` when it is given;
    no files: the hub dataset. `max_samples` keeps a seeded random subset (the same rows for the same seed, from
    either source).
    """
    missing = missing_files(files)
    if files and not missing:
        rows, source = _load_local(list(files), what), ", ".join(files)
    elif files and not path:
        raise missing_error(what, missing[0])
    elif path:
        rows = (fallback_to_hub(missing[0], path, config, split, what, revision) if missing
                else load_hub(path, config, split, what, revision))
        source = hub_name(path, config, split, revision)
    else:
        raise GpartError(f"no {what} source: set the recipe's files (local) or data.path (hub dataset id)")
    if len(rows) == 0:
        raise GpartError(f"{what} split {source} is empty; check the file or split name")
    if max_samples is not None and max_samples < len(rows):
        rows = rows.shuffle(seed=seed).select(range(max_samples))
    return rows, source


def load_rows(files: list[str] | None, path: str | None, config: str | None, split: str,
              max_samples: int | None = None, seed: int = 0, what: str = "data", revision: str | None = None):
    """`load_rows_with_source` without the source name."""
    return load_rows_with_source(files, path, config, split, max_samples, seed, what, revision)[0]


def require_columns(rows, columns: list[str], source: str) -> None:
    """Raise `GpartError` naming the missing columns and the ones found."""
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise GpartError(f"{source} lacks column(s) {', '.join(missing)}; found {', '.join(rows.column_names)}. "
                         f"Set data.text_columns / data.label_column / data.query_column to the right names")
