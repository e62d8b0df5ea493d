"""`gpart inspect`: show an adapter (docs/design.md §4)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .common import TrustRemoteCode, console, user_errors


@user_errors
def inspect(adapter: Annotated[str, typer.Argument(help="A .gpart adapter file, a gpart run dir, an authors' GPart "
                                                      "adapter dir, or hf://user/name on the Hub.")],
            as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
            model: Annotated[Optional[str], typer.Option(help="Authors' adapters: the base model whose config resolves "
                                                              "the targets (default: the one the adapter records).")]
            = None, trust_remote_code: TrustRemoteCode = False):
    """Show an adapter: d, seed, partition, targets, N, base fingerprint, head, theta stats, recipe."""
    from ..adapters.inspection import render, summarize_adapter
    from ..adapters.reference import open_adapter

    summary = summarize_adapter(open_adapter(adapter, "ADAPTER"), model, trust_remote_code)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render(summary, console)
