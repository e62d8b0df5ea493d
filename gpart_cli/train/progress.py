"""Rich display for training: the progress bar (step, loss, lr, throughput, ETA) and the before/after table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def step_bar(console: Console, label: str, fields: dict[str, str], total: int, start: int = 0,
             enabled: bool = True) -> tuple[Progress, TaskID]:
    """A Rich bar over optimizer steps: the label, the bar, step/total, one column per field (its text reads the value
    as {task.fields[NAME]}; "-" until the first update), elapsed time and ETA."""
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        *(TextColumn(text) for text in fields.values()), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=False, disable=not enabled)
    return progress, progress.add_task(label, total=total, completed=start, **{name: "-" for name in fields})


class TrainProgress:
    """A progress bar whose fields are updated once per optimizer step."""

    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True) -> None:
        self.progress, self.task = step_bar(console, "train", {"loss": "loss [cyan]{task.fields[loss]}",
                                                               "lr": "lr {task.fields[lr]}",
                                                               "rate": "{task.fields[rate]} samples/s"},
                                            total, start, enabled)

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
