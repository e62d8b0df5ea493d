"""Answer extraction and comparison for the math benchmarks (docs/design.md §7).

Pure functions, no model code. Each extractor mirrors a published protocol so our numbers are comparable:
MetaMath's "The answer is: " convention, lm-evaluation-harness gsm8k strict/flexible (string exact match, exactly as
the harness scores it, plus numeric variants of the same extractions), and Hendrycks' MATH `last_boxed_only_string` /
`remove_boxed` / `is_equiv` (re-implemented here). Numeric answers are compared as exact rationals (Fraction).
"""

from __future__ import annotations

import re

from ..data.numeric_answer import mawps_reference, normalize_number, numbers_equal  # noqa: F401 (the extractors' API)

_ANSWER_MARK = "The answer is: "
# First number after MetaMath's marker: thousands commas only in proper groups, then a decimal or "/q" tail.
_METAMATH_NUMBER = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+|/\d+)?|\.\d+)")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k.yaml: exact_match with these regexes_to_ignore (applied in this
# order, to the prediction and to the full reference answer) and ignore_case; the regex filter's no-match fallback.
LM_EVAL_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
LM_EVAL_FALLBACK = "[invalid]"


# ---------------------------------------------------------------- numbers


def _lm_eval_clean(match: str) -> str | None:
    """lm-eval gsm8k's target filtering: strip, drop "," and "$", drop one trailing ".", normalise."""
    cleaned = match.strip().replace(",", "").replace("$", "")
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    return normalize_number(cleaned)


# ---------------------------------------------------------------- GSM8K / MAWPS


def gsm8k_reference(answer: str) -> str | None:
    """The number after the last "####" in a GSM8K reference answer, normalised."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1].strip().replace(",", ""))


def metamath_answer(text: str) -> str | None:
    """MetaMath's extraction: the first number after the last "The answer is: ", normalised."""
    if _ANSWER_MARK not in text:
        return None
    match = _METAMATH_NUMBER.search(text.rsplit(_ANSWER_MARK, 1)[1].strip())
    return None if match is None else normalize_number(match.group().replace(",", ""))


def _lm_eval_filter(text: str, pattern: re.Pattern, group_select: int) -> str:
    """lm-eval's `regex` filter: match `group_select` of findall, its first non-empty group, stripped; else the
    fallback "[invalid]"."""
    found = pattern.findall(text if isinstance(text, str) else "")
    if not found:
        return LM_EVAL_FALLBACK
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), LM_EVAL_FALLBACK)
    return match.strip()


def lm_eval_strict_match(text: str) -> str:
    """What lm-eval's gsm8k "strict-match" filter keeps: the FIRST "#### <number>" run, or "[invalid]"."""
    return _lm_eval_filter(text, _STRICT, 0)


def lm_eval_flexible_match(text: str) -> str:
    """What lm-eval's gsm8k "flexible-extract" filter keeps: the LAST number-like run, or "[invalid]"."""
    return _lm_eval_filter(text, _FLEXIBLE, -1)


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match for gsm8k: strings equal after `LM_EVAL_IGNORE` and lower-casing, nothing numeric.

    `reference` is the dataset's whole answer (worked solution and "#### N"); "72.00" does not match "72".
    """
    for pattern in LM_EVAL_IGNORE:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


def lm_eval_strict(text: str) -> str | None:
    """The numeric value of lm-eval's "strict-match" extraction (the FIRST "#### <number>"), normalised, or None.

    For the `strict_numeric` score: the harness's own `strict` compares strings (`lm_eval_exact_match`).
    """
    found = _STRICT.findall(text)
    return _lm_eval_clean(found[0]) if found else None


def lm_eval_flexible(text: str) -> str | None:
    """The numeric value of lm-eval's "flexible-extract" (the LAST number-like run), normalised, or None."""
    found = _FLEXIBLE.findall(text)
    if not found:
        return None
    groups = [g for g in found[-1] if g]  # findall yields (group1, group2); exactly one is non-empty
    return _lm_eval_clean(groups[0]) if groups else None


# ---------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces) or "\\boxed tok"; else None."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    head = "\\boxed" if text.startswith("\\boxed", idx) else "\\fbox"
    rest = text[idx + len(head):]
    if rest.startswith(" "):  # "\boxed 5$" form: the token runs to the next "$" or whitespace
        token = re.split(r"[\s$]", rest.lstrip(" "), maxsplit=1)[0]
        return token or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None  # unbalanced: the model stopped mid-answer


def math_answer(text: str) -> str | None:
    """A model's MATH answer: text after the last "The answer is: ", else the last box, else None."""
    if _ANSWER_MARK in text:
        # As MetaMath's eval: cut at the first ".\n" (the model may go on to a new question).
        answer = text.rsplit(_ANSWER_MARK, 1)[1].split(".\n")[0].strip()
        answer = answer[:-1].rstrip() if answer.endswith(".") else answer
        if answer:
            return answer
    return last_boxed(text)


def math_reference(solution: str) -> str | None:
    """The reference answer of a MATH solution: its last boxed expression."""
    return last_boxed(solution)


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1b -> \\frac{1}{b}, \\frac1{72} -> \\frac{1}{72}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:
            return s  # "\frac" with nothing to fix: keep the string as written
        a, b, tail = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + tail if b == "{" else "{" + b + "}" + tail)
    return out


def _fix_a_slash_b(s: str) -> str:
    """A plain "3/4" -> "\\frac{3}{4}" (only when both sides are bare integers)."""
    parts = s.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        return s
    a, b = int(parts[0]), int(parts[1])
    return "\\frac{%d}{%d}" % (a, b) if s == f"{a}/{b}" else s  # reject "03/4"-style spellings


def _remove_right_units(s: str) -> str:
    """Drop a trailing "\\text{ unit}" (the reference's heuristic: "\\text{ " only marks units)."""
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several \\text{ } groups")  # the reference asserts; is_equiv falls back
        return parts[0]
    return s


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        out += "\\sqrt" + (part if part.startswith("{") else "{" + part[0] + "}" + part[1:])
    return out  # an empty part raises IndexError, as in the reference; is_equiv falls back


def _strip_string(s: str) -> str:
    """Hendrycks' MATH answer normalisation (math_equivalence._strip_string)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs_rhs = s.split("=")
    if len(lhs_rhs) == 2 and len(lhs_rhs[0]) <= 2:  # "k = 5" / "x=5": a short LHS is just a label
        s = lhs_rhs[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_is_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks' MATH is_equiv: equal after `_strip_string`; None never matches (not even None)."""
    if a is None or b is None:
        return False  # unlike the reference (None == None), a missing answer must not score
    try:
        return _strip_string(a) == _strip_string(b)
    except (IndexError, ValueError):
        return a == b
