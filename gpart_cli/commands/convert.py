"""`gpart convert`: the authors' adapter format to `.gpart` and back (docs/interop.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import GpartError
from .common import TrustRemoteCode, console, user_errors


@user_errors
def convert(source: Annotated[Path, typer.Argument(help="An authors' GPart adapter dir, or a .gpart file with "
                                                        "--to peft-gpart.")],
            output: Annotated[Path, typer.Option("-o", "--output", help="The .gpart file, or the dir to write.")],
            to: Annotated[str, typer.Option(help="gpart (a .gpart file) or peft-gpart (the authors' format).")]
            = "gpart",
            model: Annotated[Optional[str], typer.Option(help="Base model whose config resolves the authors' "
                                                              "target_modules (default: the one the adapter "
                                                              "records).")] = None,
            trust_remote_code: TrustRemoteCode = False):
    """Convert between a .gpart adapter and the authors' PEFT-fork GPart format (their partitions only)."""
    from ..adapters.authors_convert import to_gpart, to_peft_gpart

    if to == "gpart":
        out = to_gpart(source, output, model, trust_remote_code)
    elif to == "peft-gpart":
        out = to_peft_gpart(source, output)
    else:
        raise GpartError(f"--to {to!r}: use gpart or peft-gpart")
    console.print(f"wrote [bold]{out}[/]")
