"""benchmarks/replicate.py's reporting and benchmarks/seed_spread.py: docs/results.md's tables are the stored runs
re-reported under the current dev rule, wall times add up over resumed calls, and the chance figures are exact."""

import importlib.util
import itertools
import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


replicate = _load("replicate")
seed_spread = _load("seed_spread")


def _brute_force_any_disjoint(methods: int, seeds: int) -> Fraction:
    """Every ordering of methods·seeds distinct scores: the share where some pair's [min, max] ranges are disjoint."""
    hits = total = 0
    for order in itertools.permutations(range(methods * seeds)):
        ranks = [order[m * seeds:(m + 1) * seeds] for m in range(methods)]
        spans = [(min(r), max(r)) for r in ranks]
        hits += any(a[1] < b[0] or b[1] < a[0] for a, b in itertools.combinations(spans, 2))
        total += 1
    return Fraction(hits, total)


@pytest.mark.parametrize("methods, seeds", [(2, 3), (3, 2), (4, 2), (2, 4)])
def test_chance_of_disjoint_ranges_matches_brute_force(methods, seeds):
    assert seed_spread.p_any_disjoint(methods, seeds) == _brute_force_any_disjoint(methods, seeds)


def test_chance_figures_quoted_in_the_docs():
    assert seed_spread.p_pair_disjoint(3) == Fraction(1, 10) == seed_spread.p_any_disjoint(2, 3)
    assert seed_spread.at_least_once(Fraction(1, 10), 4) == Fraction(3439, 10000)
    assert seed_spread.table(3) in (ROOT / "docs" / "results.md").read_text()


def _record(task, method, lr, dev, seed=0):
    return {"task": task, "method": method, "d": None, "seed": seed, "lr": lr, "dev_score": dev,
            "run": f"{method}-{lr}", "selected": False, "score": 0.5}


def test_reselect_applies_the_tie_rule_per_task_and_leaves_evals_alone():
    runs = [_record("sst2", "gpart", lr, 0.8) for lr in (5e-3, 2e-2, 5e-2)]
    runs += [_record("stsb", "gpart", lr, dev) for lr, dev in ((5e-3, 0.7), (2e-2, 0.6), (5e-2, 0.7))]
    runs.append({"task": "gsm8k", "method": "base", "score": 0.1, "selected": True})  # an eval: no grid
    assert [r["selected"] for r in replicate.reselect(runs)] == [False, True, False, True, False, False, True]


def test_wall_times_add_up_over_calls(tmp_path):
    def job(task, start, end):
        j = replicate.Job({"task": task, "method": "gpart"}, ["gpart", "sweep-d"], tmp_path / task, "accuracy")
        j.ran = (start, end) if start is not None else None
        return j

    # Two tasks side by side: each task's span runs from its first command's start to its last one's end.
    first = replicate.wall_times([job("sst2", 100, 400), job("sst2", 120, 700), job("stsb", 110, 500)], tmp_path,
                                 650.4)
    assert first == {"all": 650, "by_task": {"sst2": 600, "stsb": 390}}
    # A resumed call: the sst2 commands were read back (not run), stsb ran again for 100 s; totals add up.
    second = replicate.wall_times([job("sst2", None, None), job("stsb", 0, 100)], tmp_path, 120)
    assert second == {"all": 770, "by_task": {"sst2": 600, "stsb": 490}}
    assert json.loads((tmp_path / "replicate-wall-seconds.json").read_text()) == second


@pytest.mark.parametrize("family", ["glue", "vision", "math", "sweep"])
def test_results_doc_holds_the_stored_runs_reported_under_the_current_rule(family):
    doc = json.loads((replicate.RESULTS / f"replicate-{family}.json").read_text())
    stored = [r.get("selected") for r in doc["runs"]]
    runs = replicate.reselect(doc["runs"])
    assert [r.get("selected") for r in runs] == stored  # the raw JSON's flags already follow the current rule
    table = {"math": replicate.markdown_math, "sweep": lambda r: replicate.markdown(r, "d")}.get(
        family, replicate.markdown)([r for r in runs if r.get("task") != "fashion6-pretrain"])  # report(), no plot
    assert table in (ROOT / "docs" / "results.md").read_text()
    assert doc["selection"] == replicate.SELECTION and doc["wall_seconds_total"] > 0 and "wall_seconds_by_task" in doc
