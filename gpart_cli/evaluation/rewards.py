"""Verifiable rewards for RL on the math tasks (docs/rl.md): a completion scores as `gpart eval` would score it.

The reward of a completion is 1.0 when the eval task's scorer (the same answer extraction and comparison as
`gpart eval`, `tasks.GENERATION_TASKS`) marks it correct, else 0.0; the completion is first cut at the stop strings
that evaluation cuts at. The optional format reward pays for an answer the task's extraction can read at all.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import GpartError
from . import answers
from .generate import cut_at_stop
from .tasks import generation_task

# What each task's format reward looks for: an answer its eval extraction can read ("The answer is: N" for the
# numeric tasks; that, or a last \boxed{}, for MATH).
_READABLE: dict[str, Callable[[str], object]] = {"gsm8k": answers.metamath_answer, "mawps": answers.metamath_answer,
                                                 "math": answers.math_answer, "math500": answers.math_answer}


def scorer_names(task: str) -> list[str]:
    """The scorers `gpart eval` reports for `task`, in its order (the first is the default reward)."""
    return list(generation_task(task).scorers)


def check_scorer(task: str, scorer: str | None) -> str:
    """`scorer` (default: the task's first), or GpartError naming the field and the choices."""
    names = scorer_names(task)
    if scorer is None:
        return names[0]
    if scorer not in names:
        raise GpartError(f"recipe field rl.reward = {scorer!r} is not a scorer of task {task}; use one of "
                         f"{', '.join(names)}")
    return scorer


def correctness(task: str, scorer: str | None, rows: Sequence[dict], stops: Sequence[str]) -> Callable:
    """A TRL reward function: 1.0 for a completion `gpart eval` scores correct on its row, else 0.0.

    The dataset handed to TRL carries the column `row` (an index into `rows`), which TRL passes back per completion.
    """
    name = check_scorer(task, scorer)
    check = generation_task(task).scorers[name]

    def reward(completions, row, **_) -> list[float]:
        return [float(bool(check(cut_at_stop(text, stops), rows[i]))) for text, i in zip(completions, row)]

    reward.__name__ = f"{task}_{name}"  # TRL logs rewards/<name>/mean
    return reward


def readable_answer(task: str, stops: Sequence[str]) -> Callable:
    """A TRL reward function: 1.0 when the task's extraction finds an answer in the completion at all."""
    extract = _READABLE[task]

    def reward(completions, **_) -> list[float]:
        return [float(extract(cut_at_stop(text, stops)) is not None) for text in completions]

    reward.__name__ = "format"
    return reward
