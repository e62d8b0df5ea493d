"""`gpart train`: fine-tune from a recipe (docs/design.md §5.2, §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import Device, Overrides, err_console, user_errors


@user_errors
def train(recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
          overrides: Overrides = None,
          output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory "
                                                          "(default runs/RECIPE_NAME).")] = None,
          resume: Annotated[bool, typer.Option(help="Continue the run in --output from its last checkpoint.")] = False,
          overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --output.")] = False,
          dry_run: Annotated[bool, typer.Option(help="Print the resolved recipe, the data, the trainable parameter "
                                                     "count and (SFT) one rendered training example with its loss "
                                                     "mask, then stop; no weights are read.")] = False,
          device: Device = None):
    """Fine-tune a model from a YAML recipe: writes adapter, metrics.jsonl, checkpoints and results.json."""
    from ..recipe.schema import load_recipe
    from ..train.run import default_output, run

    parsed = load_recipe(recipe, overrides or [])
    out = output or default_output(parsed)
    try:
        run(parsed, out, resume=resume, overwrite=overwrite, dry_run=dry_run, console=err_console, device=device)
    except KeyboardInterrupt as e:  # run() said where the run resumes from
        raise typer.Exit(getattr(e, "exit_code", 130)) from None
