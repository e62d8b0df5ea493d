"""How often "beyond the seed spread" happens by chance: the numbers docs/results.md §1.3 quotes.

    python benchmarks/seed_spread.py                 # 3 seeds, the comparisons of docs/results.md's tables
    python benchmarks/seed_spread.py --seeds 5

The results call a difference "beyond the seed spread" when two methods' [min, max] ranges over seeds do not
overlap. Suppose the methods do not differ at all: every score is an independent draw from one continuous
distribution. Then the ranks of the 2s scores of two methods are a uniformly random split, and their ranges are
disjoint when one method holds the s lowest ranks: probability 2 / C(2s, s), 1/10 for s = 3.

For k methods, intervals on a line pairwise overlap exactly when they share a point (Helly, in one dimension),
i.e. when the largest minimum is at most the smallest maximum. With the scores uniform on [0, 1] (any continuous
distribution gives the same ranks), the method holding the largest minimum m has density s(1-m)^(s-1) for it,
and each other method must have its minimum below m and its maximum above m, probability
q(m) = 1 - m^s - (1-m)^s. So P(no pair disjoint) = k ∫_0^1 s(1-m)^(s-1) q(m)^(k-1) dm, a polynomial integral,
computed here exactly in fractions.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from math import comb


def _mul(a: list[Fraction], b: list[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _binomial_power(sign: int, n: int) -> list[Fraction]:
    """Coefficients (lowest degree first) of (1 + sign·m)^n."""
    return [Fraction(comb(n, i) * sign ** i) for i in range(n + 1)]


def p_pair_disjoint(seeds: int) -> Fraction:
    """Two identical methods, `seeds` runs each: the chance their [min, max] ranges do not overlap."""
    return Fraction(2, comb(2 * seeds, seeds))


def p_any_disjoint(methods: int, seeds: int) -> Fraction:
    """`methods` identical methods, `seeds` runs each: the chance that at least one pair's ranges do not overlap."""
    if methods < 2:
        return Fraction(0)
    s = seeds
    q = [Fraction(1)] + [Fraction(0)] * s  # q(m) = 1 - m^s - (1 - m)^s
    q[s] -= 1
    q = [a - b for a, b in zip(q, _binomial_power(-1, s))]
    integrand = [Fraction(s) * c for c in _binomial_power(-1, s - 1)]
    for _ in range(methods - 1):
        integrand = _mul(integrand, q)
    none_disjoint = methods * sum(c / (i + 1) for i, c in enumerate(integrand))
    return 1 - none_disjoint


def at_least_once(p: Fraction, independent: int) -> Fraction:
    """The chance of an event of probability `p` in at least one of `independent` independent tries."""
    return 1 - (1 - p) ** independent


def table(seeds: int) -> str:
    """The comparisons made in docs/results.md, if no method differed from another."""
    pair = p_pair_disjoint(seeds)
    rows = [
        ("one pair of methods", 1, pair, pair),
        ("3 methods (math SFT, one metric)", 3, 3 * pair, p_any_disjoint(3, seeds)),
        ("6 methods (one GLUE task, or vision)", 15, 15 * pair, p_any_disjoint(6, seeds)),
        ("GLUE: 4 tasks x 6 methods", 60, 60 * pair, at_least_once(p_any_disjoint(6, seeds), 4)),
        ("d sweep: GPart vs Uni-LoRA at 4 d", 4, 4 * pair, at_least_once(pair, 4)),
    ]
    lines = [f"{seeds} seeds per method; P(one pair's ranges are disjoint) = {pair} = {float(pair):.4f}", "",
             "| comparisons | pairs | expected disjoint pairs | P(at least one) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {float(e):.2f} | {float(p):.3f} |" for name, n, e, p in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    print(table(p.parse_args().seeds))


if __name__ == "__main__":
    main()
