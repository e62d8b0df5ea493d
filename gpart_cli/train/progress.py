"""Rich display for training: the progress bar (step, loss, lr, throughput, ETA) and the before/after table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class TrainProgress:
    """A progress bar whose fields are updated once per optimizer step."""

    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console, transient=False, disable=not enabled)
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", rate="-")

    def __enter__(self) -> "TrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{rate:.1f}")


def summary_table(results: dict) -> Table:
    """Scores before and after training on the eval split (none for an SFT run without eval.task), then the best dev
    score, the one that picked the checkpoint: for SFT the dev loss."""
    table = Table(title=f"{results['task']} · {results['method']} · {results['trainable_params']:,} trainable params")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    fmt = (lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))  # noqa: E731
    before, after = results.get("before") or {}, results.get("after") or {}
    for key in after or before:
        table.add_row(key, fmt(before.get(key)), fmt(after.get(key)))
    for key, value in (results.get("best_dev") or {}).items():
        table.add_row(f"dev {key} (best, step {results.get('best_step')})", "-", fmt(value))
    return table
