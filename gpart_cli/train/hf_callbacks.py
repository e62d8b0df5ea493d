"""`TrainerCallback`s that give a Hugging Face / TRL run gpart's run-dir outputs: `metrics.jsonl` and Rich progress.

TRL logs its RL statistics (mean reward, its spread, KL to the reference, completion lengths) through
`Trainer.log`; these callbacks write each record as one JSON line, as `gpart train` does for SFT, and show the
latest reward and KL on a Rich progress bar instead of tqdm.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback

from .progress import step_bar

# TRL's log key -> the metrics.jsonl key (the ones a reader of an RL run looks at first)
KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "reward": "reward",
        "reward_std": "reward_std", "kl": "kl", "entropy": "entropy", "completions/mean_length": "completion_length",
        "frac_reward_zero_std": "frac_reward_zero_std", "step_time": "step_time"}


def metrics_record(step: int, epoch: float | None, logs: dict) -> dict | None:
    """One metrics.jsonl line from a Trainer log dict (None for the end-of-training summary)."""
    if "train_runtime" in logs:
        return None
    record = {"step": step, "epoch": epoch}
    record.update({ours: float(logs[theirs]) for theirs, ours in KEYS.items() if theirs in logs})
    rewards = {k.split("/")[1]: float(v) for k, v in logs.items() if k.startswith("rewards/") and k.endswith("/mean")}
    if rewards:
        record["rewards"] = rewards
    return record


class MetricsLog(TrainerCallback):
    """Append every training log record to `path` (metrics.jsonl)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = metrics_record(state.global_step, state.epoch, logs or {})
        if record is not None and state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class RichProgress(TrainerCallback):
    """A Rich bar per optimizer step showing the latest mean reward and KL (the Trainer's tqdm off)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress, self.task = step_bar(self.console, "grpo", {"reward": "reward [cyan]{task.fields[reward]}",
                                                                   "kl": "kl {task.fields[kl]}"},
                                            state.max_steps, state.global_step)
        self.progress.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or "reward" not in logs:
            return
        kl = logs.get("kl")
        self.progress.update(self.task, completed=state.global_step, reward=f"{float(logs['reward']):.3f}",
                             kl="-" if kl is None or not math.isfinite(float(kl)) else f"{float(kl):.4f}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LinkLast(TrainerCallback):
    """After each save, point `checkpoints/last` at the newest `checkpoint-N` (what `gpart train --resume` and the run
    dir's checks look for), swapped with one atomic rename like gpart's own checkpoints."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        newest = max(self.folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)
        if newest is None:
            return
        link = self.folder / ".last.link"
        if link.is_symlink():
            link.unlink()
        os.symlink(newest.name, link)
        os.replace(link, self.folder / "last")
