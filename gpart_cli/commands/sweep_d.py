"""`gpart sweep-d`: one run per (method, d, seed, lr), then a table and a plot (docs/design.md §5.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import GpartError
from .common import Device, Overrides, console, err_console, user_errors


@user_errors
def sweep_d(recipe: Annotated[Path, typer.Argument(help="A recipe YAML file.")],
            d: Annotated[str, typer.Option("--d", help="Comma-separated d values, e.g. 1000,4000,16000.")],
            seeds: Annotated[str, typer.Option(help="Comma-separated seeds (method and training seed).")] = "0",
            method: Annotated[str, typer.Option(help="Comma-separated methods side by side, e.g. gpart,unilora.")]
            = "gpart",
            lr: Annotated[Optional[list[str]], typer.Option("--lr", help="Learning-rate grid for θ / the adapter "
                          "(linear_probe: its head), chosen per (method, d, seed) on the dev split: "
                          "--lr 5e-3,2e-2,5e-2 for every method, --lr full=5e-5,2e-4 for one (repeatable).")] = None,
            lr_head: Annotated[Optional[str], typer.Option("--lr-head", help="Head learning rates crossed with "
                               "--lr (e.g. 5e-3,2e-2), or 'tie' to train the head at the run's --lr.")] = None,
            overrides: Overrides = None,
            output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep directory (default "
                                                            "runs/sweep-RECIPE_NAME).")] = None,
            rerun_changed: Annotated[bool, typer.Option("--rerun-changed", help="Train again the runs in --output "
                                                        "whose recorded recipe differs from this sweep's (else "
                                                        "they are refused).")] = False,
            device: Device = None):
    """Train and evaluate one run per d, seed and learning rate; the dev split picks the lr; write a table,
    results.csv/json and plot.png."""
    from ..recipe.schema import METHODS
    from ..train.sweep import parse_ints, parse_lr_grid, parse_lr_head, sweep

    methods = [m.strip() for m in method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GpartError(f"--method {method!r}: use some of {', '.join(METHODS)}")
    out = output or Path("runs") / f"sweep-{recipe.stem}"
    try:
        sweep(recipe, overrides or [], methods, parse_ints(d, "--d"), parse_ints(seeds, "--seeds"), out, err_console,
              lrs=parse_lr_grid(lr or [], methods), lr_heads=parse_lr_head(lr_head), device=device,
              rerun_changed=rerun_changed)
    except KeyboardInterrupt as e:
        err_console.print("sweep interrupted: run the same gpart sweep-d command again to go on (finished runs are "
                          "reused, the interrupted one resumes)")
        raise typer.Exit(getattr(e, "exit_code", 130)) from None
    console.print(f"results: {out / 'results.csv'} · {out / 'results.json'} · plot {out / 'plot.png'}")
