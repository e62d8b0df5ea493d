"""`gpart convert`: the authors' adapter format to `.gpart` and back (docs/interop.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import GpartError
from .common import TrustRemoteCode, console, user_errors


@user_errors
def convert(source: Annotated[str, typer.Argument(help="An authors' GPart adapter dir, or a .gpart file (or gpart "
                                                       "run dir) with --to peft-gpart.")],
            output: Annotated[Path, typer.Option("-o", "--output", help="The .gpart file, or the dir to write.")],
            to: Annotated[str, typer.Option(help="gpart (a .gpart file) or peft-gpart (the authors' format).")]
            = "gpart",
            model: Annotated[Optional[str], typer.Option(help="Base model whose config resolves the authors' "
                                                              "target_modules (default: the one the adapter "
                                                              "records).")] = None,
            trust_remote_code: TrustRemoteCode = False):
    """Convert between a .gpart adapter and the authors' PEFT-fork GPart format (their partitions only)."""
    from ..adapters.authors_convert import to_peft_gpart
    from ..adapters.reference import open_adapter, resolved_artifact
    from ..core.artifact import write_artifact

    if to not in ("gpart", "peft-gpart"):
        raise GpartError(f"--to {to!r}: use gpart or peft-gpart")
    ref = open_adapter(source, "SOURCE")
    if to == "peft-gpart" and ref.kind == "authors":
        raise GpartError(f"{source} is already in the authors' format; --to peft-gpart converts a .gpart file")
    art = resolved_artifact(ref, model, trust_remote_code)
    out = write_artifact(output, art.meta, art.theta, art.head) if to == "gpart" else to_peft_gpart(art, output)
    console.print(f"wrote [bold]{out}[/]")
