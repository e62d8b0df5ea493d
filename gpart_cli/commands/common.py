"""What every `gpart` command shares: the consoles, the user-error wrapper (exit 2) and the common options."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import GpartError

# soft_wrap: a line is printed whole, never cut at the console width (80 columns when piped to a file), so a printed
# command or path can be copied as it is. Tables still fit the width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def user_errors(fn):
    """Turn a `GpartError` into a clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GpartError as e:
            _exit_with(e)

    return wrapper


def _exit_with(e: GpartError):
    # escape: messages quote install commands like pip install 'gpart[vllm]', which Rich reads as markup
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the "
                                                "model repository (never taken from an adapter file).")]


def _resolved_device(value: Optional[str]) -> Optional[str]:
    """Every command's --device, resolved where it is parsed (by `devices.resolve_device`, the one resolver): a typo
    or a GPU this machine lacks stops the command with exit 2 before any model or data is loaded. "cuda" becomes
    "cuda:N"; unset and "auto" stay as they are (under torchrun each process then takes its local device)."""
    if value is None or value.strip().lower() == "auto":
        return value
    from ..adapters.devices import resolve_device

    try:
        return str(resolve_device(value))
    except GpartError as e:
        _exit_with(e)


Device = Annotated[Optional[str], typer.Option(callback=_resolved_device, help="auto | cpu | cuda | cuda:N (default "
                                               "auto: cuda when torch sees a GPU, else cpu).")]


Overrides = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: "
                                                   "--set train.lr_theta=1e-3 (repeatable).")]
