"""Numeric answer text as exact rationals: "1,234.00" -> "1234", "3/4" -> "0.75", and equality by value.

The one definition of a normalised number, shared by the data layer (the MAWPS reference written into SFT
targets, `data.sft`) and the evaluation layer (the extractors of `evaluation.answers`), so neither imports
the other's internals.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

_DECIMAL = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_FRACTION = re.compile(r"^[+-]?\d+/\d+$")


def _to_fraction(s: str | None) -> Fraction | None:
    """The exact rational value of a numeric string ("$1,234.00", "-5", "3/4"), or None."""
    if s is None:
        return None
    t = str(s).strip().replace(",", "").replace("$", "").replace(" ", "")
    if _DECIMAL.match(t):
        return Fraction(t[:-1] if t.endswith(".") else t)  # "42." is 42; Fraction rejects the bare dot
    if _FRACTION.match(t):
        num, den = t.split("/")
        return None if int(den) == 0 else Fraction(int(num), int(den))
    return None


def _format_fraction(value: Fraction) -> str:
    """Canonical text: integers bare, terminating decimals exact, anything else as "p/q"."""
    if value.denominator == 1:
        return str(value.numerator)
    den, k = value.denominator, 0
    while den % 2 == 0 or den % 5 == 0:  # terminates in base 10 iff the denominator is 2^a * 5^b
        den //= 2 if den % 2 == 0 else 5
        k += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    sign = "-" if value < 0 else ""
    scaled = abs(value) * 10**k  # an exact integer by construction
    digits = str(scaled.numerator).rjust(k + 1, "0")
    return f"{sign}{digits[:-k]}.{digits[-k:]}".rstrip("0").rstrip(".")


def normalize_number(s: str) -> str | None:
    """Canonical string of a numeric answer ("1,234.00" -> "1234", "3/4" -> "0.75"), or None."""
    value = _to_fraction(s)
    return None if value is None else _format_fraction(value)


def numbers_equal(pred: str | None, ref: str | None) -> bool:
    """True when both parse as numbers with exactly the same rational value."""
    a, b = _to_fraction(pred), _to_fraction(ref)
    return a is not None and b is not None and a == b


def mawps_reference(value) -> str | None:
    """A MAWPS answer (number or numeric string such as 5.0, "5", "12.50"), normalised."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        # Shortest round-trip text (12.5 -> "12.5", not the binary expansion), exponent spelled out.
        value = format(Decimal(repr(float(value))), "f")
    return normalize_number(str(value))
