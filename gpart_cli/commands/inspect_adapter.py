"""`gpart inspect`: show an adapter (docs/design.md §4)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .common import TrustRemoteCode, console, user_errors


@user_errors
def inspect(adapter: Annotated[str, typer.Argument(help="A .gpart adapter file, an authors' GPart adapter dir, or "
                                                      "hf://user/name on the Hub.")],
            as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
            model: Annotated[Optional[str], typer.Option(help="Authors' adapters: the base model whose config resolves "
                                                              "the targets (default: the one the adapter records).")]
            = None, trust_remote_code: TrustRemoteCode = False):
    """Show an adapter: d, seed, partition, targets, N, base fingerprint, head, theta stats, recipe."""
    from ..adapters import authors_format
    from ..adapters.authors_convert import open_adapter
    from ..adapters.hub import adapter_path
    from ..adapters.inspection import render, summarize, summarize_unresolved
    from ..errors import GpartError

    path = adapter_path(adapter)
    try:
        summary = summarize(open_adapter(path, model, trust_remote_code))
    except GpartError as e:  # an authors' adapter whose recorded base cannot be opened: what its own files say
        if model is not None or not authors_format.is_adapter(path):
            raise
        summary = summarize_unresolved(authors_format.read(path), str(e))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render(summary, console)
