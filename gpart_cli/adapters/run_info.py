"""`gpart_run.json`: what a run records beside a PEFT adapter or a full model dir (method, task, recipe), so that
`gpart eval` scores it as it was trained. The training layer writes it (`methods`); the evaluation layer reads it,
from here, without importing the training layer."""

from __future__ import annotations

import json
from pathlib import Path

RUN_INFO = "gpart_run.json"


def write_run_info(directory: Path, method: str, task: dict, recipe: dict) -> None:
    (directory / RUN_INFO).write_text(json.dumps({"method": method, "task": task, "recipe": recipe}, indent=2))


def read_run_info(directory: Path) -> dict:
    """The record in `directory`, or {} when it has none (a model dir not written by gpart)."""
    info = directory / RUN_INFO
    return json.loads(info.read_text()) if info.is_file() else {}
