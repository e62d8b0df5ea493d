"""Generation tasks (DESIGN §7): GSM8K, MATH and MAWPS rows, prompts, references and scores.

Each example's prediction is kept (JSONL beside the scores) so every number can be audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..data.sources import load_rows, require_columns
from ..errors import GpartError
from . import answers
from .metrics import exact_match_rate


@dataclass(frozen=True)
class GenerationTask:
    hub: tuple[str | None, str | None, str]   # default (path, config, split) on the hub
    query_column: str
    reference: Callable[[dict], str | None]
    scorers: dict[str, Callable[[str, str | None], bool]]  # name -> (output, reference) -> correct


def _num(extract):
    return lambda out, ref: answers.numbers_equal(extract(out), ref)


GENERATION_TASKS = {
    "gsm8k": GenerationTask(("openai/gsm8k", "main", "test"), "question",
                            lambda r: answers.gsm8k_reference(r["answer"]),
                            {"metamath": _num(answers.metamath_answer), "strict": _num(answers.lm_eval_strict),
                             "flexible": _num(answers.lm_eval_flexible)}),
    "math": GenerationTask(("HuggingFaceH4/MATH-500", None, "test"), "problem",
                           lambda r: answers.math_reference(r["solution"]),
                           {"is_equiv": lambda out, ref: answers.math_is_equiv(answers.math_answer(out), ref)}),
    "mawps": GenerationTask((None, None, "test"), "original_text",
                            lambda r: answers.mawps_reference(r["ans"]),
                            {"metamath": _num(answers.metamath_answer), "flexible": _num(answers.lm_eval_flexible)}),
}


def generation_task(name: str) -> GenerationTask:
    if name not in GENERATION_TASKS:
        raise GpartError(f"unknown generation task {name!r}; use one of {', '.join(GENERATION_TASKS)}")
    return GENERATION_TASKS[name]


def load_task_rows(name: str, files: list[str] | None, split: str | None, limit: int | None) -> list[dict]:
    """The first `limit` rows (in file order, so subsets are comparable across runs) of the eval data."""
    task = generation_task(name)
    path, config, default_split = task.hub
    if not files and path is None:
        raise GpartError(f"task {name} has no hub copy; pass --data FILE (e.g. ../shared/assets/mawps/testset.json)")
    rows = load_rows(files, None if files else path, config, split or default_split, what=f"{name} data")
    require_columns(rows, [task.query_column], ", ".join(files) if files else f"{path}:{split or default_split}")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [dict(r) for r in rows]


def prompts_for(name: str, rows: list[dict]) -> list[str]:
    from ..data.sft import format_prompt

    column = generation_task(name).query_column
    return [format_prompt(r[column], for_eval=True) for r in rows]


def score_outputs(name: str, rows: list[dict], outputs: list[str]) -> tuple[dict, list[dict]]:
    """Scores per extraction rule and one prediction record per example."""
    task = generation_task(name)
    records = []
    for idx, (row, out) in enumerate(zip(rows, outputs)):
        ref = task.reference(row)
        record = {"idx": idx, "reference": ref, "output": out}
        record.update({f"correct_{k}": bool(fn(out, ref)) for k, fn in task.scorers.items()})
        records.append(record)
    scores = {k: exact_match_rate([r[f"correct_{k}"] for r in records]) for k in task.scorers}
    scores["n"] = len(records)
    return scores, records


def run_generation(name: str, model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int,
                   console=None) -> tuple[dict, list[dict]]:
    """Greedy-decode every prompt (with a progress bar: examples done, rate, ETA) and score it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .generate import MATH_STOPS, generate

    progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("examples · eta"),
                        TimeRemainingColumn(), console=console or Console(stderr=True), transient=True)
    with progress:
        bar = progress.add_task(name, total=len(rows))
        outputs = generate(model, tokenizer, prompts_for(name, rows), max_new_tokens=max_new_tokens,
                           batch_size=batch_size, stop=MATH_STOPS,
                           on_batch=lambda done: progress.update(bar, completed=done))
    return score_outputs(name, rows, outputs)
