"""RL rewards are `gpart eval`'s scores (docs/rl.md): the same extraction, comparison and stop-string cut."""

from __future__ import annotations

import pytest

from gpart_cli.errors import GpartError
from gpart_cli.evaluation.generate import MATH_STOPS, cut_at_stop
from gpart_cli.evaluation.rewards import check_scorer, correctness, readable_answer
from gpart_cli.evaluation.tasks import score_outputs

ROWS = [{"original_text": "q0", "ans": 12}, {"original_text": "q1", "ans": "1.5"}, {"original_text": "q2", "ans": 7}]
OUTPUTS = ["3 * 4 = 12.\nThe answer is: 12", "The answer is: 3/2 apples", "The answer is 7.",
           "The answer is: 7\n\n### Instruction:\nThe answer is: 8"]


@pytest.mark.parametrize("scorer", ["metamath", "flexible"])
def test_reward_is_the_eval_score_of_each_completion(scorer):
    rows = ROWS + [ROWS[2]]
    reward = correctness("mawps", scorer, rows, MATH_STOPS)
    got = reward(completions=OUTPUTS, row=[0, 1, 2, 3])
    _, records = score_outputs("mawps", rows, [cut_at_stop(o, MATH_STOPS) for o in OUTPUTS])
    assert got == [float(r[f"correct_{scorer}"]) for r in records]
    # Written out: "The answer is 7." lacks MetaMath's colon; the last output is cut before its second answer.
    assert got == ([1.0, 1.0, 0.0, 1.0] if scorer == "metamath" else [1.0, 0.0, 1.0, 1.0])


def test_format_reward_pays_for_a_readable_answer_only():
    reward = readable_answer("mawps", MATH_STOPS)
    assert reward(completions=OUTPUTS) == [1.0, 1.0, 0.0, 1.0]
    assert readable_answer("math", MATH_STOPS)(completions=["so \\boxed{5}", "no box"]) == [1.0, 0.0]


def test_scorer_defaults_to_the_tasks_first_and_names_the_choices():
    assert check_scorer("gsm8k", None) == "metamath" and check_scorer("math", None) == "is_equiv"
    with pytest.raises(GpartError, match="rl.reward = 'exact' is not a scorer of task gsm8k; use one of metamath, "
                                         "strict, flexible"):
        check_scorer("gsm8k", "exact")
