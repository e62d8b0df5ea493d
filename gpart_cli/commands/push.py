"""`gpart push`: upload a run to the Hugging Face Hub (docs/hub.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, user_errors


@user_errors
def push(run: Annotated[Path, typer.Argument(help="A finished run dir (the --output of gpart train).")],
         repo: Annotated[str, typer.Option(help="Hub model repo, user/name (created when missing).")],
         private: Annotated[bool, typer.Option(help="Create the repo private.")] = False):
    """Upload a run's adapter, recipe.yaml, results.json and a model card to the Hugging Face Hub."""
    from ..adapters.hub import push as push_run

    with console.status(f"pushing {run} to {repo}"):
        url = push_run(run, repo, private)
    console.print(f"pushed to [bold]{url}[/] · use it with --adapter hf://{repo}")
