"""The run dir's life cycle: what an output directory holds, what `gpart train` may do there, and when it writes.

`plan()` only reads: it classifies the directory and turns (state, --resume, --overwrite) into a decision or a
refusal that names every way out that applies. `begin()` writes, and runs only once data, model and method have
loaded: so a start that fails early leaves nothing behind that blocks the same command, and `--overwrite` deletes
the old run only when the new one is about to train.

A directory that holds a gpart `recipe.yaml` and nothing that a step writes (checkpoint, adapter, metrics, results)
is a start that failed before its first step: not a run, so any command starts afresh there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from .. import atomic
from ..errors import GpartError
from ..recipe.schema import Recipe

# What training writes from its first step on; any of these makes the directory a run worth protecting.
RUN_FILES = ("checkpoints", "metrics.jsonl", "adapter.gpart", "adapter", "model", "results.json",
             "predictions.jsonl")
# What gpart writes before the first step.
START_FILES = ("recipe.yaml",)

# Recipe fields that may change between a run and its --resume without changing the result.
_RESUME_SAFE = {"source", "name", "train.log_every", "train.on_nan", "eval.batch_size", "eval.limit",
                "eval.max_new_tokens", "eval.dev_batch_size", "train.distributed", "train.report_to"}
# The transforms only matter for vision runs.
_VISION_ONLY = {"data.train_transform", "data.eval_transform"}
# Of those, the ones a finished run's scores depend on (its final evaluation ran with them).
_SCORES = {"eval.limit", "eval.max_new_tokens"}


class DirState(Enum):
    ABSENT = "absent"
    EMPTY = "empty"
    FAILED_START = "failed start"  # recipe.yaml only: setup failed before the first step
    RESUMABLE = "resumable"        # checkpoints/last exists
    ENDED = "ended"                # results, adapter or metrics, but no checkpoint to continue from
    FOREIGN = "foreign"            # files gpart did not write


@dataclass(frozen=True)
class RunDirPlan:
    out: Path
    resume: bool           # continue from checkpoints/last
    replace: bool          # --overwrite: delete the old run in begin()
    note: str | None = None  # one line for the user (starting afresh over a failed start)


def _present(out: Path, name: str) -> bool:
    path = out / name
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def state_of(out: Path) -> DirState:
    if not out.exists():
        return DirState.ABSENT
    if not out.is_dir():
        raise GpartError(f"--output {out} is a file, not a directory; pass --output with a directory path")
    entries = list(out.iterdir())
    if not entries:
        return DirState.EMPTY
    if (out / "checkpoints" / "last").is_dir():
        return DirState.RESUMABLE
    if any(_present(out, name) for name in RUN_FILES):
        return DirState.ENDED
    if (out / "recipe.yaml").is_file():
        return DirState.FAILED_START
    return DirState.FOREIGN


def _foreign_names(out: Path) -> str:
    names = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES + START_FILES)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def plan(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> RunDirPlan:
    """Decide what `gpart train` does with `out`, or raise GpartError naming every way out. Reads only."""
    out = Path(out)
    if resume and overwrite:
        raise GpartError("--resume and --overwrite contradict each other: --resume continues the run in --output, "
                         "--overwrite replaces it; pass one of them")
    state = state_of(out)
    elsewhere = "or --output DIR to train in another directory"
    if state is DirState.FAILED_START:
        return RunDirPlan(out, resume=False, replace=False,
                          note=f"{out} holds only the recipe.yaml of a start that failed before its first step "
                               f"(no checkpoint, adapter or results): starting afresh there")
    if state in (DirState.ABSENT, DirState.EMPTY):
        if resume:
            raise GpartError(f"--resume: {out} holds no run to resume; drop --resume to start a new run there, "
                             f"or pass the --output of the run you mean")
        return RunDirPlan(out, resume=False, replace=False)
    if state is DirState.FOREIGN:
        raise GpartError(f"output dir {out} holds files gpart did not write ({_foreign_names(out)}); pass "
                         f"--output DIR to train in another directory (--overwrite replaces only gpart run dirs)")
    if resume:
        if state is DirState.ENDED:
            raise GpartError(f"--resume: {out} holds a run with no checkpoint to resume from; pass --overwrite "
                             f"instead of --resume to train it again, {elsewhere}")
        _check_same_recipe(out, recipe)
        return RunDirPlan(out, resume=True, replace=False)
    if overwrite:
        return RunDirPlan(out, resume=False, replace=True)
    if state is DirState.RESUMABLE:
        raise GpartError(f"output dir {out} already holds a run; pass --resume to continue it, --overwrite to "
                         f"replace it, {elsewhere}")
    raise GpartError(f"output dir {out} already holds a finished run; pass --overwrite to replace it, {elsewhere}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "config":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(out: Path, recipe: Recipe, finished: bool = False) -> list[str]:
    """The fields in which `recipe` differs from the one `out` recorded, as "field: old -> new", in what matters to
    the run: for a --resume, what changes the trained result; for a `finished` run reused as it is, also what
    changes its scores (eval.limit, eval.max_new_tokens)."""
    saved = out / "recipe.yaml"
    old, new = _flatten(yaml.safe_load(saved.read_text()) or {}), _flatten(recipe.to_dict())
    ignored = _RESUME_SAFE | (_VISION_ONLY if recipe.data.family != "vision" else set())
    if finished:
        ignored = ignored - _SCORES
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ignored)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def _check_same_recipe(out: Path, recipe: Recipe) -> None:
    """--resume continues the recorded recipe: refuse one that changed in what matters."""
    saved = out / "recipe.yaml"
    if not saved.is_file():
        raise GpartError(f"--resume: {out} has a checkpoint but no recipe.yaml to check it against; restore "
                         f"{saved}, or start over with --overwrite or --output DIR")
    changed = recipe_changes(out, recipe)
    if changed:
        raise GpartError(f"--resume: the recipe changed since {out} started ({'; '.join(changed[:5])}). Resume with "
                         f"the original recipe, start over with --overwrite, or train the changed recipe with "
                         f"--output DIR")


def begin(plan: RunDirPlan, recipe: Recipe) -> None:
    """Make the directory ready for the first step: replace the old run if asked, record the resolved recipe."""
    if plan.resume:
        return  # the recorded recipe.yaml stays the one the run started with
    if plan.replace and plan.out.exists():
        shutil.rmtree(plan.out)
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(plan.out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def truncate_metrics(out: Path, step: int) -> None:
    """Keep `out`/metrics.jsonl up to the step a run resumes from: no torn last line, no steps logged twice."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic.write_text(path, "".join(kept))
