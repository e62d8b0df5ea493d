"""The table `gpart train` prints at the end: before/after scores and the best dev score (issue 30, item 7)."""

from rich.console import Console

from gpart_cli.train.run import summary_table


def _text(results: dict) -> list[str]:
    console = Console(record=True, width=100)
    console.print(summary_table(results))
    return [" ".join(line.replace("│", " ").split()) for line in console.export_text().splitlines()]


def test_an_sft_run_without_an_eval_task_shows_its_dev_loss():
    lines = _text({"task": "sft/gsm8k", "method": "gpart", "trainable_params": 128, "steps": 30, "best_step": 20,
                   "best_dev": {"loss": 1.234567}, "before": None, "after": None})
    assert "dev loss (best, step 20) - 1.2346" in lines


def test_the_eval_scores_come_first_then_the_dev_score():
    lines = _text({"task": "sft/gsm8k", "method": "gpart", "trainable_params": 128, "steps": 30, "best_step": 30,
                   "best_dev": {"loss": 0.5}, "before": {"metamath": 0.25, "n": 4},
                   "after": {"metamath": 0.5, "n": 4}})
    rows = [line for line in lines if line.startswith(("metamath", "n ", "dev"))]
    assert rows == ["metamath 0.2500 0.5000", "n 4 4", "dev loss (best, step 30) - 0.5000"]
    lines = _text({"task": "glue/sst2", "method": "gpart", "trainable_params": 322, "steps": 18, "best_step": 9,
                   "best_dev": {"accuracy": 0.75}, "before": {"accuracy": 0.5}, "after": {"accuracy": 0.625}})
    assert [line for line in lines if line.startswith(("accuracy", "dev"))] == [
        "accuracy 0.5000 0.6250", "dev accuracy (best, step 9) - 0.7500"]
