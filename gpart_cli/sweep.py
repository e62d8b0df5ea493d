"""`gpart sweep-d` (DESIGN §5): one training run per (method, d, seed), then a table, CSV/JSON and a plot.

Each run lives in its own folder `<method>-d<d>-s<seed>` (d-free methods: `<method>-s<seed>`). Finished runs
(results.json present) are skipped on a rerun, interrupted ones resume from their checkpoint, and a failed
run is logged to failures.jsonl while the sweep goes on.
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

from . import atomic
from .errors import GpartError
from .evaluation import classify
from .recipe import Recipe, load_recipe

D_METHODS = ("gpart", "unilora")  # methods whose size is set by d; the others are one point per seed
GENERATION_METRIC = {"gsm8k": "metamath", "math": "is_equiv", "mawps": "metamath"}


@dataclass(frozen=True)
class RunKey:
    method: str
    d: int | None
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.method}-d{self.d}-s{self.seed}" if self.d is not None else f"{self.method}-s{self.seed}"


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GpartError(f"{flag} {text!r} should be comma-separated integers, e.g. {flag} 1000,4000,16000") from None
    if not values or min(values) < (1 if flag == "--d" else 0):
        raise GpartError(f"{flag} {text!r} needs at least one value, all {'>= 1' if flag == '--d' else '>= 0'}")
    return values


def plan(methods: list[str], ds: list[int], seeds: list[int]) -> list[RunKey]:
    return [RunKey(m, d if m in D_METHODS else None, s)
            for m in methods for d in (ds if m in D_METHODS else [None]) for s in seeds]


def main_metric(recipe: Recipe) -> str:
    if recipe.data.family == "sft":
        return GENERATION_METRIC.get(recipe.eval.task or "", "loss")
    return classify.main_metric(recipe.data.family, recipe.data.task)


def _run_one(recipe_path: Path, overrides: list[str], key: RunKey, out: Path, console: Console) -> dict:
    from .train.run import run

    extra = [f"method.name={key.method}", f"method.seed={key.seed}", f"train.seed={key.seed}"]
    if key.d is not None:
        extra.append(f"method.d={key.d}")
    recipe = load_recipe(recipe_path, [*overrides, *extra])
    resume = (out / "checkpoints" / "last").is_dir()
    return run(recipe, out, resume=resume, overwrite=not resume, console=console)


def sweep(recipe_path: Path, overrides: list[str], methods: list[str], ds: list[int], seeds: list[int],
          out: Path, console: Console | None = None) -> dict:
    """Run (or reuse) every run of the grid and write results.csv, results.json and plot.png into `out`."""
    console = console or Console(stderr=True)
    base = load_recipe(recipe_path, overrides)  # validate once, up front
    metric = main_metric(base)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in plan(methods, ds, seeds):
        run_dir = out / key.folder
        done = run_dir / "results.json"
        if done.is_file():
            console.print(f"[dim]skip {key.folder}: already finished[/]")
            results = json.loads(done.read_text())
        else:
            console.rule(key.folder)
            try:
                results = _run_one(recipe_path, overrides, key, run_dir, console)
            except (GpartError, RuntimeError, ValueError) as e:  # one bad run must not end the sweep
                console.print(f"[red]failed {key.folder}:[/] {e}")
                with open(out / "failures.jsonl", "a") as f:
                    f.write(json.dumps({"run": key.folder, "error": str(e)}) + "\n")
                continue
        rows.append(_row(key, results, metric))
    doc = {"recipe": str(recipe_path), "overrides": overrides, "metric": metric, "runs": rows,
           "summary": summarize(rows)}
    _write(out, doc)
    console.print(table(doc))
    return doc


def _row(key: RunKey, results: dict, metric: str) -> dict:
    after, before = results.get("after") or {}, results.get("before") or {}
    return {"method": key.method, "d": key.d, "seed": key.seed, "metric": metric, "score": after.get(metric),
            "base_score": before.get(metric), "trainable_params": results.get("trainable_params"),
            "best_step": results.get("best_step"), "run": key.folder}


def summarize(rows: list[dict]) -> list[dict]:
    """Median, min and max over seeds per (method, d)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["score"] is not None:
            groups.setdefault((r["method"], r["d"]), []).append(r["score"])
    return [{"method": m, "d": d, "median": statistics.median(v), "min": min(v), "max": max(v), "seeds": len(v)}
            for (m, d), v in groups.items()]


def _write(out: Path, doc: dict) -> None:
    buf = io.StringIO()
    fields = ["method", "d", "seed", "metric", "score", "base_score", "trainable_params", "best_step", "run"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(doc["runs"])
    atomic.write_text(out / "results.csv", buf.getvalue())
    atomic.write_text(out / "results.json", json.dumps(doc, indent=2))
    atomic.write_bytes(out / "plot.png", plot(doc))


def plot(doc: dict) -> bytes:
    """PNG: metric vs d (log x), median line and per-seed points per method; reference levels as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    runs, summary = doc["runs"], doc["summary"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        color = colors[i % len(colors)]
        pts = [r for r in runs if r["method"] == method and r["score"] is not None]
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


def table(doc: dict) -> Table:
    t = Table(title=f"sweep-d · {doc['metric']} (median over seeds, \\[min, max])")
    for col in ("method", "d", "median", "range", "seeds"):
        t.add_column(col, justify="right")
    for s in sorted(doc["summary"], key=lambda s: (s["method"], s["d"] or 0)):
        t.add_row(s["method"], f"{s['d']:,}" if s["d"] else "-", f"{s['median']:.4f}",
                  f"[{s['min']:.4f}, {s['max']:.4f}]", str(s["seeds"]))
    return t
