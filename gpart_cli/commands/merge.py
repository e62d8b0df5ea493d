"""`gpart merge`: fold an adapter into its base and write a standard model dir (docs/design.md §5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import Device, TrustRemoteCode, console, err_console, user_errors


@user_errors
def merge(base: Annotated[str, typer.Argument(help="Base model: a transformers dir, hub id or pkg:PACKAGE/dir.")],
          adapter: Annotated[str, typer.Argument(help="The GPart adapter to fold in: a .gpart file, a gpart run dir, "
                                                      "hf://user/name, or an authors' GPart adapter (dir or either "
                                                      "of its files).")],
          output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write the merged model to.")],
          dtype: Annotated[Optional[str], typer.Option(help="float32 | bfloat16 | float16 (default: the "
                                                             "dtype the adapter was trained on).")] = None,
          trust_remote_code: TrustRemoteCode = False, device: Device = None,
          check: Annotated[bool, typer.Option("--check", help="Print the largest difference between merged and "
                                                              "unmerged logits on a few fixed inputs.")] = False):
    """Write a standard transformers model dir with the target weights = W0 + Pθ and the head restored."""
    from ..adapters.devices import resolve_device
    from ..adapters.merged_dir import merge_to_dir
    from ..adapters.reference import open_adapter

    where = resolve_device(device)
    ref = open_adapter(adapter, "ADAPTER")
    with console.status(f"merging on {where}"):
        out = merge_to_dir(base, ref, output, dtype, trust_remote_code, where, check=check)
    if check:
        out, result = out
        console.print(result.describe())
    console.print(f"merged model written to [bold]{out}[/] (loads with AutoModel*.from_pretrained)")
    if json.loads((out / "config.json").read_text()).get("gpart_pooling") == "mean":
        err_console.print("[yellow]note:[/] this model was trained with model.pooling: mean (recorded as gpart_pooling "
                          "in config.json). gpart eval applies it; plain transformers pools with [CLS] instead")
