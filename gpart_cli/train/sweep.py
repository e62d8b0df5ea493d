"""`gpart sweep-d` (docs/design.md §5): one training run per (method, d, seed), then a table, CSV/JSON and a plot.

Each run lives in its own folder `<method>-d<d>-s<seed>` (d-free methods: `<method>-s<seed>`). Finished runs
(results.json present) are skipped on a rerun, interrupted ones resume from their checkpoint, and a failed
run is logged to failures.jsonl while the sweep goes on. A finished or interrupted run whose recorded recipe is not
the one the sweep would train now (compared as `gpart train --resume` compares them) is refused up front, naming
the difference, or trained again from scratch with `rerun_changed` (`--rerun-changed`).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import atomic
from ..errors import GpartError
from ..evaluation import classify
from ..partition.feistel import check_d
from ..recipe.methods import D_METHODS  # methods whose size is set by d; the others are one point per seed
from ..recipe.schema import Recipe, load_recipe

TIE = "tie"  # --lr-head tie: the head trains at the run's θ learning rate


@dataclass(frozen=True)
class RunKey:
    """One run of the grid. `lr` sets train.lr_theta (the head's lr for linear_probe, which has no adapter);
    `lr_head` sets train.lr_head (TIE: equal to `lr`); None keeps the recipe's value."""

    method: str
    d: int | None
    seed: int
    lr: float | None = None
    lr_head: float | str | None = None

    @property
    def folder(self) -> str:
        parts = [self.method]
        if self.d is not None:
            parts.append(f"d{self.d}")
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.lr_head is not None:
            parts.append("lrh-tie" if self.lr_head == TIE else f"lrh{self.lr_head:g}")
        return "-".join([*parts, f"s{self.seed}"])

    @property
    def cell(self) -> tuple:
        """The (method, d, seed) point the lr grid of this run belongs to: dev picks one run per cell."""
        return self.method, self.d, self.seed

    def overrides(self) -> list[str]:
        extra = [f"method.name={self.method}", f"method.seed={self.seed}", f"train.seed={self.seed}"]
        if self.d is not None:
            extra.append(f"method.d={self.d}")
        if self.lr is not None:
            extra.append(f"train.{'lr_head' if self.method == 'linear_probe' else 'lr_theta'}={self.lr!r}")
        if self.lr_head is not None and self.method != "linear_probe":
            extra.append(f"train.lr_head={(self.lr if self.lr_head == TIE else self.lr_head)!r}")
        return extra


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GpartError(f"{flag} {text!r} should be comma-separated integers, e.g. {flag} 1000,4000,16000") from None
    if not values or (flag != "--d" and min(values) < 0):
        raise GpartError(f"{flag} {text!r} needs at least one value, all >= 0")
    return [check_d(v, name=flag) for v in values] if flag == "--d" else values


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise GpartError(f"{flag} {text!r} should be comma-separated positive numbers, e.g. {flag} 5e-3,2e-2,5e-2")
    return values


def parse_lr_grid(items: list[str], methods: list[str]) -> dict[str, list[float | None]]:
    """Learning rates per method from `--lr LIST` (every method) and `--lr METHOD=LIST` (that method)."""
    default: list[float | None] = [None]
    per_method: dict[str, list[float | None]] = {}
    for item in items:
        name, eq, values = item.rpartition("=")
        if not eq:
            default = list(parse_floats(item, "--lr"))
        elif name not in methods:
            raise GpartError(f"--lr {item!r}: {name!r} is not one of the swept methods ({', '.join(methods)})")
        else:
            per_method[name] = list(parse_floats(values, f"--lr {name}="))
    return {m: per_method.get(m, default) for m in methods}


def parse_lr_head(text: str | None) -> list[float | str | None]:
    if text is None:
        return [None]
    return [TIE] if text.strip() == TIE else list(parse_floats(text, "--lr-head"))


def plan(methods: list[str], ds: list[int], seeds: list[int], lrs: dict[str, list] | None = None,
         lr_heads: list | None = None) -> list[RunKey]:
    """Every run of the grid, cell by cell (method, d, seed), each cell's lr grid in the order given."""
    lrs = lrs or {}
    keys = []
    for m in methods:
        for d in (ds if m in D_METHODS else [None]):
            for s in seeds:
                heads = [None] if m == "linear_probe" else (lr_heads or [None])
                keys += [RunKey(m, d, s, lr, h) for lr in lrs.get(m, [None]) for h in heads]
    return keys


def main_metric(recipe: Recipe) -> str:
    if recipe.data.family == "sft":
        from ..evaluation.tasks import GENERATION_TASKS

        task = GENERATION_TASKS.get(recipe.eval.task or "")
        return next(iter(task.scorers)) if task else "loss"  # a task's first scorer is its headline rule
    return classify.main_metric(recipe.data.family, recipe.data.task)


def dev_score(recipe: Recipe, results: dict) -> float | None:
    """The run's best dev score, by the rule that picked its checkpoint; None without a dev split."""
    from .trainer import dev_score as score  # torch and the trainer only when a sweep runs

    best = results.get("best_dev")
    return score(recipe, best) if best else None


def _run_one(recipe_path: Path, overrides: list[str], key: RunKey, out: Path, console: Console,
             device: str | None = None, fresh: bool = False) -> dict:
    from .run import run

    recipe = load_recipe(recipe_path, [*overrides, *key.overrides()])
    resume = not fresh and (out / "checkpoints" / "last").is_dir()
    return run(recipe, out, resume=resume, overwrite=not resume, console=console, device=device)


def changed_runs(recipe_path: Path, overrides: list[str], keys: list[RunKey], out: Path) -> dict[str, list[str]]:
    """The runs in `out` that a sweep would reuse (finished) or resume (interrupted) but whose recorded recipe is
    not the one it would train now, by folder, with their differences (`run_dir.recipe_changes`)."""
    from .run_dir import recipe_changes

    changed = {}
    for key in keys:
        folder = out / key.folder
        finished, resumable = (folder / "results.json").is_file(), (folder / "checkpoints" / "last").is_dir()
        if not (finished or resumable) or not (folder / "recipe.yaml").is_file():
            continue  # trained from scratch anyway
        diffs = recipe_changes(folder, load_recipe(recipe_path, [*overrides, *key.overrides()]), finished=finished)
        if diffs:
            changed[key.folder] = diffs
    return changed


def _refuse_changed(changed: dict[str, list[str]], out: Path) -> None:
    shown = "; ".join(f"{folder} ({', '.join(diffs[:3])})" for folder, diffs in list(changed.items())[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise GpartError(f"{out} holds runs of another recipe than this sweep's: {shown}{more}. Pass --rerun-changed to "
                     f"train those again (their old runs are replaced), sweep with the recipe they were trained "
                     f"with, or pass --output DIR for a new sweep")


def sweep(recipe_path: Path, overrides: list[str], methods: list[str], ds: list[int], seeds: list[int],
          out: Path, console: Console | None = None, lrs: dict[str, list] | None = None,
          lr_heads: list | None = None, device: str | None = None, rerun_changed: bool = False) -> dict:
    """Run (or reuse) every run of the grid on `device` (as `gpart train --device`) and write results.csv,
    results.json and plot.png into `out`. A run in `out` of another recipe is refused (GpartError), or with
    `rerun_changed` trained again.

    Where a cell (method, d, seed) has several learning rates, the run with the best dev score is selected and
    its test score is the cell's result; the test split never chooses.
    """
    console = console or Console(stderr=True)
    base = load_recipe(recipe_path, overrides)  # validate once, up front
    if device is not None:
        from ..adapters.devices import resolve_device

        resolve_device(device)  # a bad --device is one error, not one logged failure per run
    keys = plan(methods, ds, seeds, lrs, lr_heads)
    several_lrs = len({k.cell for k in keys}) < len(keys)  # some cell has a grid to choose from
    if several_lrs and base.data.dev_fraction <= 0 and base.data.family != "sft":
        raise GpartError("choosing the learning rate needs a dev split: set data.dev_fraction > 0 (e.g. --set "
                         "data.dev_fraction=0.1) or pass one value per method to --lr")
    metric = main_metric(base)
    changed = changed_runs(recipe_path, overrides, keys, out)
    if changed and not rerun_changed:
        _refuse_changed(changed, out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in keys:
        run_dir = out / key.folder
        done = run_dir / "results.json"
        if done.is_file() and key.folder not in changed:
            console.print(f"[dim]skip {key.folder}: already finished[/]")
            results = json.loads(done.read_text())
        else:
            console.rule(key.folder)
            try:
                results = _run_one(recipe_path, overrides, key, run_dir, console, device,
                                   fresh=key.folder in changed)
            except (GpartError, RuntimeError, ValueError) as e:  # one bad run must not end the sweep
                console.print(f"[red]failed {key.folder}:[/] {e}")
                with open(out / "failures.jsonl", "a") as f:
                    f.write(json.dumps({"run": key.folder, "error": str(e)}) + "\n")
                continue
        rows.append(_row(key, results, metric, dev_score(base, results)))
    rows = select_by_dev(rows)
    doc = {"recipe": str(recipe_path), "overrides": overrides, "metric": metric, "runs": rows,
           "summary": summarize(rows)}
    _write(out, doc)
    console.print(table(doc))
    return doc


def _row(key: RunKey, results: dict, metric: str, dev: float | None) -> dict:
    after, before = results.get("after") or {}, results.get("before") or {}
    return {"method": key.method, "d": key.d, "seed": key.seed, "lr": key.lr,
            "lr_head": key.lr if key.lr_head == TIE else key.lr_head, "metric": metric, "score": after.get(metric),
            "dev_score": dev, "selected": False, "base_score": before.get(metric),
            "trainable_params": results.get("trainable_params"), "best_step": results.get("best_step"),
            "run": key.folder}


def select_by_dev(rows: list[dict], cell: tuple[str, ...] = ("method", "d", "seed")) -> list[dict]:
    """Mark one run per cell (method, d, seed): the best dev score; ties go to the run nearest the middle of the
    cell's grid (in grid order; of two equally near, the earlier). docs/design.md §5.3.

    A cell with one run selects it. Runs without a dev score never win against runs with one. The tie rule looks
    at the grid only: a 100-row dev split scores in steps of 0.01, and "first in the grid" would favour the
    smallest learning rate.
    """
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in cell), []).append(r)
    for runs in cells.values():
        scored = [i for i, r in enumerate(runs) if r["dev_score"] is not None]
        top = max((runs[i]["dev_score"] for i in scored), default=None)
        tied = [i for i in scored if runs[i]["dev_score"] == top] or [0]
        middle = (len(runs) - 1) / 2
        best = min(tied, key=lambda i: (abs(i - middle), i))
        for i, r in enumerate(runs):
            r["selected"] = i == best
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Median, min and max over seeds per (method, d), of the dev-selected run of each seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["selected"] and r["score"] is not None:
            groups.setdefault((r["method"], r["d"]), []).append(r)
    return [{"method": m, "d": d, "median": statistics.median(x["score"] for x in v),
             "min": min(x["score"] for x in v), "max": max(x["score"] for x in v), "seeds": len(v),
             "lrs": [x["lr"] for x in v], "lr_heads": [x["lr_head"] for x in v]}
            for (m, d), v in groups.items()]


def _write(out: Path, doc: dict) -> None:
    buf = io.StringIO()
    fields = ["method", "d", "seed", "lr", "lr_head", "metric", "score", "dev_score", "selected", "base_score",
              "trainable_params", "best_step", "run"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(doc["runs"])
    atomic.write_text(out / "results.csv", buf.getvalue())
    atomic.write_text(out / "results.json", json.dumps(doc, indent=2))
    atomic.write_bytes(out / "plot.png", plot(doc))


def plot(doc: dict) -> bytes:
    """PNG: metric vs d (log x), median line and per-seed points per method; reference levels as lines.

    Only the dev-selected run of each (method, d, seed) is drawn: the other learning rates are in the CSV/JSON.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    runs, summary = doc["runs"], doc["summary"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        color = colors[i % len(colors)]
        pts = [r for r in runs if r["method"] == method and r["selected"] and r["score"] is not None]
        med = sorted((s["d"], s["median"]) for s in summary if s["method"] == method and s["d"] is not None)
        if med:
            ax.plot([d for d, _ in med], [m for _, m in med], marker="o", color=color, label=f"{method} (median)")
            ax.scatter([r["d"] for r in pts], [r["score"] for r in pts], color=color, alpha=0.4, s=14)
        elif pts:  # d-free methods (LoRA, full, linear probe): a level across the plot
            ax.axhline(statistics.median(r["score"] for r in pts), color=color, linestyle="--",
                       label=f"{method} (median)")
    base = [r["base_score"] for r in runs if r["base_score"] is not None]
    if base:
        ax.axhline(statistics.median(base), color="grey", linestyle=":", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("d (trainable θ entries)")
    ax.set_ylabel(doc["metric"])
    ax.set_title(Path(doc["recipe"]).stem)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _lr_text(values: list) -> str:
    return ", ".join("-" if v is None else f"{v:g}" for v in values)


def table(doc: dict) -> Table:
    grid = any(r["lr"] is not None or r["lr_head"] is not None for r in doc["runs"])
    title = "sweep-d · {} (median over seeds, \\[min, max]{})".format(
        doc["metric"], "; lr chosen per seed on the dev split" if grid else "")
    t = Table(title=title)
    for col in ("method", "d", "median", "range", "seeds", *(("lr", "lr_head") if grid else ())):
        t.add_column(col, justify="right")
    for s in sorted(doc["summary"], key=lambda s: (s["method"], s["d"] or 0)):
        cells = [s["method"], f"{s['d']:,}" if s["d"] else "-", f"{s['median']:.4f}",
                 f"[{s['min']:.4f}, {s['max']:.4f}]", str(s["seeds"])]
        if grid:
            cells += [_lr_text(s["lrs"]), _lr_text(s["lr_heads"])]
        t.add_row(*cells)
    return t
