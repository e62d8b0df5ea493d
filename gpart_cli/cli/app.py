"""`gpart` commands (DESIGN §5). Exit codes: 0 ok, 2 user error (a `GpartError`), 1 internal error."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import GpartError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune Hugging Face models with GPart: one vector theta, partitioned over all weights.")
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn a `GpartError` into a clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GpartError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def not_yet(command: str, issue: str) -> None:
    raise GpartError(f"`gpart {command}` is not yet implemented in this version ({issue}); "
                     f"use the Python API meanwhile")


@app.command()
@user_errors
def inspect(adapter: Annotated[Path, typer.Argument(help="A .gpart adapter file.")],
            as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False):
    """Show an adapter: d, seed, partition, targets, N, base fingerprint, head, theta stats, recipe."""
    from ..artifact import read_artifact
    from ..inspection import render, summarize

    summary = summarize(read_artifact(adapter))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render(summary, console)


@app.command()
@user_errors
def merge(base: Annotated[str, typer.Argument(help="Base model: a transformers dir, hub id or pkg:PACKAGE/dir.")],
          adapter: Annotated[Path, typer.Argument(help="The .gpart adapter to fold in.")],
          output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write the merged model to.")],
          dtype: Annotated[Optional[str], typer.Option(help="float32 | bfloat16 | float16 (default: the "
                                                             "dtype the adapter was trained on).")] = None):
    """Write a standard transformers model dir with the target weights = W0 + Pθ and the head restored."""
    from ..export import merge_to_dir

    with console.status("merging"):
        out = merge_to_dir(base, adapter, output, dtype)
    console.print(f"merged model written to [bold]{out}[/] (loads with AutoModel*.from_pretrained)")


@app.command()
@user_errors
def train(recipe: Annotated[Path, typer.Argument(help="A recipe YAML file.")]):
    """Fine-tune a model from a YAML recipe."""
    not_yet("train", "issue 3")


@app.command(name="eval")
@user_errors
def evaluate(task: Annotated[str, typer.Option(help="Task to score, e.g. gsm8k.")]):
    """Score a model, an adapter, or given predictions on a task."""
    not_yet("eval", "issue 3")


@app.command(name="sweep-d")
@user_errors
def sweep_d(recipe: Annotated[Path, typer.Argument(help="A recipe YAML file.")]):
    """Train and evaluate one run per d (and seed); write a table, CSV/JSON and a plot."""
    not_yet("sweep-d", "issue 6")


def main() -> None:
    app()
