"""GSM8K strict/flexible scored exactly as lm-evaluation-harness scores them (lm_eval/tasks/gsm8k/gsm8k.yaml).

The harness extracts a string (regex filter, take_first; "[invalid]" when nothing matches) and compares it with the
dataset's WHOLE answer by exact_match after regexes_to_ignore [",", "\\$", "(?s).*#### ", "\\.$"] and ignore_case:
strings, not numbers. The strict/flexible expectations below were worked out from the harness's code and checked
against its own RegexFilter and exact_match_hf_evaluate (harness commit 4e7e0d47); the numeric variants
(strict_numeric, flexible_numeric) compare the same extractions as rationals.
"""

from __future__ import annotations

import pytest

from gpart_cli.evaluation.answers import (
    LM_EVAL_FALLBACK,
    LM_EVAL_IGNORE,
    lm_eval_exact_match,
    lm_eval_flexible_match,
    lm_eval_strict_match,
)
from gpart_cli.evaluation.tasks import score_outputs

ANSWER_72 = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
ANSWER_1000 = "He pays 2 * $500 = $<<2*500=1000>>1000.\n#### 1000"
ANSWER_NEG = "The change is 3 - 8 = -5 degrees.\n#### -5"
ANSWER_HALF = "Each gets 1/2 = 0.5 liters.\n#### 0.5"

# (output, reference answer, strict, flexible, strict_numeric, flexible_numeric)
CASES = [
    ("so 48 + 24 = 72\n#### 72", ANSWER_72, True, True, True, True),
    ("#### 72.00", ANSWER_72, False, False, True, True),            # string "72.00" is not "72"
    ("The total is 72.00 clips.", ANSWER_72, False, False, False, True),  # no "####": strict is [invalid]
    ("#### 72.", ANSWER_72, True, True, True, True),                # one trailing "." is ignored
    ("The answer is 72...", ANSWER_72, False, False, False, False),  # "72..." minus one "." is "72..": no number
    ("It costs $1,000.", ANSWER_1000, False, True, False, True),    # "$" and "," ignored
    ("#### 1,000", ANSWER_1000, True, True, True, True),
    ("#### $1,000", ANSWER_1000, False, True, False, True),         # "$" is not in the strict pattern
    ("#### 1000.0", ANSWER_1000, False, False, True, True),
    ("#### -5", ANSWER_NEG, True, True, True, True),
    ("it drops by 5", ANSWER_NEG, False, False, False, False),
    ("#### .5", ANSWER_HALF, False, False, True, True),             # ".5" is not "0.5" as a string
    ("#### 0.50", ANSWER_HALF, False, False, True, True),
    ("#### 0.5\nQuestion: next\n#### 3", ANSWER_HALF, True, False, True, False),  # strict: first; flexible: last
    ("no number here", ANSWER_72, False, False, False, False),
]


@pytest.mark.parametrize("output, answer, strict, flexible, strict_num, flexible_num", CASES)
def test_gsm8k_scores_case_by_case(output, answer, strict, flexible, strict_num, flexible_num):
    _, records = score_outputs("gsm8k", [{"question": "q", "answer": answer}], [output])
    got = {k: records[0][f"correct_{k}"] for k in ("strict", "flexible", "strict_numeric", "flexible_numeric")}
    assert got == {"strict": strict, "flexible": flexible, "strict_numeric": strict_num,
                   "flexible_numeric": flexible_num}


def test_filters_keep_what_the_harness_keeps():
    assert lm_eval_strict_match("so\n#### 1,234.\nmore") == "1,234."
    assert lm_eval_strict_match("#### 3\n#### 5") == "3"                       # take_first
    assert lm_eval_flexible_match("#### 3\n#### 5") == "5"                     # group_select -1
    assert lm_eval_flexible_match("pay $12 now") == "$12"
    assert lm_eval_flexible_match("answer 7") == "7"                           # the second alternative
    assert lm_eval_strict_match("nothing") == lm_eval_flexible_match("nothing") == LM_EVAL_FALLBACK == "[invalid]"


def test_exact_match_applies_the_yaml_regexes_in_order_and_ignores_case():
    assert LM_EVAL_IGNORE == (",", "\\$", "(?s).*#### ", "\\.$")
    assert lm_eval_exact_match("1000", "Total: $1,000.\n#### 1,000")
    assert lm_eval_exact_match("ABC", "work #### abc")                           # ignore_case
    assert not lm_eval_exact_match("[invalid]", "#### 5")
    assert lm_eval_exact_match("5", "first #### 4\nthen #### 5")                 # greedy: up to the LAST "#### "


def test_scores_aggregate_per_rule():
    rows = [{"question": "q", "answer": answer} for _, answer, *_ in CASES]
    scores, _ = score_outputs("gsm8k", rows, [output for output, *_ in CASES])
    for i, name in enumerate(("strict", "flexible", "strict_numeric", "flexible_numeric")):
        assert scores[name] == sum(case[2 + i] for case in CASES) / len(CASES)
    assert scores["n"] == len(CASES)
