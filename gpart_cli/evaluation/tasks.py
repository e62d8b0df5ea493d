"""Generation tasks (docs/design.md §7): GSM8K, MATH (the 5,000-problem test), MATH-500 and MAWPS rows, prompts,
references, generation lengths and scores.

Each example's prediction is kept (JSONL beside the scores) so every number can be audited.

Generation lengths are the reference scripts': MetaMath's eval_gsm8k.py stops at 512 new tokens and eval_math.py at
2,048 (truncated solutions score as wrong); MAWPS follows LLM-Adapters' evaluate.py (256), the source of its split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..data.sources import load_rows_with_source, require_columns
from ..errors import GpartError
from . import answers
from .metrics import exact_match_rate


@dataclass(frozen=True)
class GenerationTask:
    hub: tuple[str | None, str | None, str]   # default (path, config, split) on the hub
    query_column: str
    reference: Callable[[dict], str | None]   # what a prediction record shows as the reference
    scorers: dict[str, Callable[[str, dict], bool]]  # name -> (output, row) -> correct
    max_new_tokens: int                        # the reference script's generation length


def _numeric(extract, reference):
    """Correct when `extract(output)` equals the task's reference as an exact rational."""
    return lambda out, row: answers.numbers_equal(extract(out), reference(row))


def _lm_eval(extract):
    """lm-evaluation-harness gsm8k exact_match: the extracted string against the row's full answer."""
    return lambda out, row: answers.lm_eval_exact_match(extract(out), row["answer"])


def _math_equiv(out: str, row: dict) -> bool:
    return answers.math_is_equiv(answers.math_answer(out), answers.math_reference(row["solution"]))


def _gsm8k_ref(row: dict) -> str | None:
    return answers.gsm8k_reference(row["answer"])


def _mawps_ref(row: dict) -> str | None:
    return answers.mawps_reference(row["ans"])


def _math_ref(row: dict) -> str | None:
    return answers.math_reference(row["solution"])


GENERATION_TASKS = {
    "gsm8k": GenerationTask(("openai/gsm8k", "main", "test"), "question", _gsm8k_ref,
                            {"metamath": _numeric(answers.metamath_answer, _gsm8k_ref),
                             "strict": _lm_eval(answers.lm_eval_strict_match),
                             "flexible": _lm_eval(answers.lm_eval_flexible_match),
                             "strict_numeric": _numeric(answers.lm_eval_strict, _gsm8k_ref),
                             "flexible_numeric": _numeric(answers.lm_eval_flexible, _gsm8k_ref)}, 512),
    # The full MATH test (5,000 problems) as the paper, MetaMath and the GPart code score it; hendrycks/
    # competition_math is gone from the hub, DigitalLearningGmbH/MATH-lighteval serves the same test as parquet.
    "math": GenerationTask(("DigitalLearningGmbH/MATH-lighteval", "default", "test"), "problem", _math_ref,
                           {"is_equiv": _math_equiv}, 2048),
    "math500": GenerationTask(("HuggingFaceH4/MATH-500", None, "test"), "problem", _math_ref,
                              {"is_equiv": _math_equiv}, 2048),
    # No hub copy of this MAWPS split (LLM-Adapters' 1,898 / 237 / 238) exists: pass --data.
    "mawps": GenerationTask((None, None, "test"), "original_text", _mawps_ref,
                            {"metamath": _numeric(answers.metamath_answer, _mawps_ref),
                             "flexible": _numeric(answers.lm_eval_flexible, _mawps_ref)}, 256),
}


def generation_task(name: str) -> GenerationTask:
    if name not in GENERATION_TASKS:
        raise GpartError(f"unknown generation task {name!r}; use one of {', '.join(GENERATION_TASKS)}")
    return GENERATION_TASKS[name]


def max_new_tokens_for(name: str, requested: int | None) -> int:
    """`requested`, or the task's reference generation length."""
    return requested if requested is not None else generation_task(name).max_new_tokens


def load_task_rows(name: str, files: list[str] | None, split: str | None, limit: int | None) -> list[dict]:
    """The first `limit` rows (in file order, so subsets are comparable across runs) of the eval data.

    Local `files` win; absent ones fall back to the task's hub dataset (MAWPS has none: its files are required).
    """
    task = generation_task(name)
    path, config, default_split = task.hub
    if not files and path is None:
        raise GpartError(f"task {name} has no hub copy; pass --data FILE (e.g. ../shared/assets/mawps/testset.json)")
    rows, source = load_rows_with_source(files, path, config, split or default_split, what=f"{name} data")
    require_columns(rows, [task.query_column], source)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [dict(r) for r in rows]


def prompts_for(name: str, rows: list[dict], rendering=None, tokenizer=None) -> list[str]:
    """Evaluation prompts: MetaMath's, or those of `rendering` (`data.chat.Rendering`, the run's) with `tokenizer`."""
    from ..data.sft import format_prompt

    column = generation_task(name).query_column
    if rendering is not None:
        return [rendering.eval_prompt(r[column], tokenizer) for r in rows]
    return [format_prompt(r[column], for_eval=True) for r in rows]


def score_outputs(name: str, rows: list[dict], outputs: list[str]) -> tuple[dict, list[dict]]:
    """Scores per extraction rule and one prediction record per example."""
    task = generation_task(name)
    records = []
    for idx, (row, out) in enumerate(zip(rows, outputs)):
        record = {"idx": idx, "reference": task.reference(row), "output": out}
        record.update({f"correct_{k}": bool(fn(out, row)) for k, fn in task.scorers.items()})
        records.append(record)
    scores = {k: exact_match_rate([r[f"correct_{k}"] for r in records]) for k in task.scorers}
    scores["n"] = len(records)
    return scores, records


def run_generation(name: str, model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int | None,
                   console=None, autocast=None, part: tuple[int, int] = (0, 1),
                   rendering=None) -> tuple[dict, list[dict]]:
    """Greedy-decode every prompt (under `autocast`, with a progress bar: examples done, rate, ETA) and score it.

    With `part` (rank, world size) of a process group, each rank decodes its share of the batches (no bar but on
    rank 0) and every rank gets all outputs and the scores (`generate.gather_outputs`). `rendering`
    (`data.chat.Rendering`) makes the prompts and adds its stop strings; default MetaMath's prompt.
    """
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .generate import MATH_STOPS, gather_outputs, generate, model_device

    progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("examples · eta"),
                        TimeRemainingColumn(), console=console or Console(stderr=True), transient=True,
                        disable=part[0] != 0)
    device = model_device(model)
    with progress, torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        bar = progress.add_task(name, total=len(rows))
        stops = MATH_STOPS if rendering is None else rendering.stops(tokenizer, MATH_STOPS)
        outputs = generate(model, tokenizer, prompts_for(name, rows, rendering, tokenizer),
                           max_new_tokens=max_new_tokens_for(name, max_new_tokens), batch_size=batch_size,
                           stop=stops, on_batch=lambda done: progress.update(bar, completed=done), part=part)
    return score_outputs(name, rows, gather_outputs(outputs) if part[1] > 1 else outputs)
