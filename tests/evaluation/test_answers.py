"""Answer extraction and comparison (docs/design.md §7): exact expectations for the protocols we mirror."""

from __future__ import annotations

import pytest

from gpart_cli.evaluation.answers import (
    gsm8k_reference,
    last_boxed,
    lm_eval_flexible,
    lm_eval_strict,
    math_answer,
    math_is_equiv,
    math_reference,
    mawps_reference,
    metamath_answer,
    normalize_number,
    numbers_equal,
)

# ---------------------------------------------------------------- normalize_number / numbers_equal


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,234.00", "1234"),
        ("1234", "1234"),
        ("1234.0", "1234"),
        ("$1,234", "1234"),
        ("$1,234.00", "1234"),
        ("-5", "-5"),
        ("-12", "-12"),
        ("0.50", "0.5"),
        ("3/4", "0.75"),
        ("-3/4", "-0.75"),
        ("8/2", "4"),
        ("1/3", "1/3"),  # non-terminating: kept exact as p/q
        ("42.", "42"),
        (".5", "0.5"),
        ("-0", "0"),
        (" 7 ", "7"),
        ("0.1", "0.1"),
        ("1.25", "1.25"),
        ("-0.05", "-0.05"),
        ("+3", "3"),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("raw", ["", "abc", "1/0", "1.2.3", "--5", "x=5", "[invalid]", "."])
def test_normalize_number_rejects_non_numbers(raw):
    assert normalize_number(raw) is None


def test_numbers_equal_is_exact_rational():
    assert numbers_equal("0.75", "3/4")
    assert numbers_equal("$1,234.00", "1234")
    assert numbers_equal("0.3", "3/10")
    assert not numbers_equal("0.30000000000000004", "0.3")  # float artefacts must not match
    assert not numbers_equal("1/3", "0.333333")
    assert not numbers_equal("5", "-5")


def test_numbers_equal_none_never_matches():
    assert not numbers_equal(None, "5")
    assert not numbers_equal("5", None)
    assert not numbers_equal(None, None)
    assert not numbers_equal("abc", "abc")


# ---------------------------------------------------------------- GSM8K references


def test_gsm8k_reference():
    assert gsm8k_reference("She pays 2 * 3 = <<2*3=6>>6 dollars.\n#### 6") == "6"
    assert gsm8k_reference("Total: 1,234\n#### 1,234") == "1234"
    assert gsm8k_reference("He loses money.\n#### -12") == "-12"
    assert gsm8k_reference("#### 3\nfixup\n#### 5") == "5"  # last marker wins
    assert gsm8k_reference("no marker here") is None


# ---------------------------------------------------------------- MetaMath


def test_metamath_basic_and_trailing_text():
    assert metamath_answer("so 6*7 = 42.\nThe answer is: 42") == "42"
    assert metamath_answer("The answer is: 42. Next question: what is 3+4?") == "42"


def test_metamath_formats():
    assert metamath_answer("The answer is: $1,234.00") == "1234"
    assert metamath_answer("The answer is: -12") == "-12"
    assert metamath_answer("The answer is: 3/4") == "0.75"
    assert metamath_answer("The answer is: 2.50 dollars") == "2.5"


def test_metamath_uses_last_marker():
    text = "The answer is: 7\nQuestion: ... The answer is: 9"
    assert metamath_answer(text) == "9"


def test_metamath_missing():
    assert metamath_answer("I think it is 42") is None
    assert metamath_answer("The answer is: unknown") is None
    assert metamath_answer("The answer is 42") is None  # the colon is part of the marker


# ---------------------------------------------------------------- lm-eval strict / flexible


def test_lm_eval_strict():
    assert lm_eval_strict("blah\n#### 1,234.") == "1234"
    assert lm_eval_strict("#### -12") == "-12"
    assert lm_eval_strict("#### $5") is None  # "$" is not in the strict pattern: no match
    assert lm_eval_strict("The answer is 42") is None


def test_lm_eval_strict_takes_first_marker():
    # lm-eval's strict-match filter runs regex findall and then take_first, so when a model keeps
    # generating (a second few-shot answer), the FIRST "#### n" is scored, not the last.
    assert lm_eval_strict("#### 3\nQuestion: next\n#### 5") == "3"


def test_lm_eval_flexible_takes_last_number():
    assert lm_eval_flexible("3 apples and 4 pears make 7.") == "7"
    assert lm_eval_flexible("#### 3\nQuestion: next\n#### 5") == "5"
    assert lm_eval_flexible("It costs $1,234.00 in total") == "1234"
    assert lm_eval_flexible("the change is -12") == "-12"
    assert lm_eval_flexible("answer 5") == "5"  # single digit: the second alternative
    assert lm_eval_flexible("no numbers at all") is None


# ---------------------------------------------------------------- MAWPS


@pytest.mark.parametrize(
    "value, expected",
    [
        (5.0, "5"),
        ("5", "5"),
        ("12.50", "12.5"),
        (12.5, "12.5"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (7, "7"),
        (float("nan"), None),
        ("abc", None),
        (None, None),
    ],
)
def test_mawps_reference(value, expected):
    assert mawps_reference(value) == expected


# ---------------------------------------------------------------- MATH extraction


def test_last_boxed():
    assert last_boxed("so \\boxed{3} and then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("$\\boxed{\\sqrt{2}+1}$") == "\\sqrt{2}+1"  # nested braces
    assert last_boxed("the answer is $\\boxed 5$.") == "5"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # unbalanced
    assert last_boxed("nothing boxed") is None


def test_math_answer():
    assert math_answer("We get 1/2.\nThe answer is: \\frac{1}{2}.") == "\\frac{1}{2}"
    assert math_answer("The answer is: 3.\nThe answer is: 5.\nQuestion: next") == "5"
    assert math_answer("The answer is: 4.\nNew problem here") == "4"
    assert math_answer("Thus $\\boxed{\\sqrt{2}+1}$.") == "\\sqrt{2}+1"
    assert math_answer("I do not know") is None


def test_math_reference():
    assert math_reference("Hence $x = \\boxed{\\dfrac{3}{4}}$.") == "\\dfrac{3}{4}"
    assert math_reference("no box") is None


# ---------------------------------------------------------------- MATH equivalence


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "\\frac34"),
        ("\\tfrac{3}{4}", "3/4"),
        ("\\sqrt{2}+1", "\\sqrt2+1"),
        ("x = 5", "5"),
        ("k=5", "5"),
        ("10\\%", "10"),
        ("10%", "10"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$5", "5"),
        ("5\\text{ cm}", "5"),
        ("\\left(1, 2\\right)", "(1,2)"),
        (".5", "0.5"),
        ("\\frac{1}{.5}", "\\frac{1}{0.5}"),
        ("\\!1", "1"),
    ],
)
def test_math_is_equiv_true(a, b):
    assert math_is_equiv(a, b)
    assert math_is_equiv(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\frac{1}{3}", "0.5"),
        ("5", "6"),
        ("x+y = 5", "5"),  # long LHS is part of the answer, not a label
        ("\\sqrt{2}", "2"),
    ],
)
def test_math_is_equiv_false(a, b):
    assert not math_is_equiv(a, b)


def test_math_is_equiv_none():
    assert not math_is_equiv(None, "5")
    assert not math_is_equiv("5", None)
    assert not math_is_equiv(None, None)


def test_math_is_equiv_falls_back_to_raw_on_strip_error():
    # "\sqrt" with nothing after it makes the reference normalisation raise: compare raw strings.
    assert math_is_equiv("\\sqrt", "\\sqrt")
    assert not math_is_equiv("\\sqrt", "\\sqrt{}")
