"""Where GPart's CPU step time over the floor goes: the same step with parts of the layer stubbed out.

    python benchmarks/step_breakdown.py                 # preset small (see step_time.py), 31 rounds
    python benchmarks/step_breakdown.py --preset medium --rounds 21
    python benchmarks/step_breakdown.py --preset compact      # 6x384, 896 tokens: the d-sized work weighs most
    python benchmarks/step_breakdown.py --preset compact --seq 256   # 512 tokens
    GPART_CPU_KERNEL=0 python benchmarks/step_breakdown.py   # torch ops instead of the compiled CPU loops

Variants, timed interleaved in one process after warm-up (ratios to the floor taken round by round, then the
median), all on the same model and batch:
- gpart: the real layer;
- no_build: W_eff is W0 itself (no gather, no add of W0; on the CPU backward reuses forward's W_eff);
- no_work: also no grouped sum (∂L/∂W is still computed, its reduction into the step's ∂L/∂θ sink is skipped);
- floor: `step_time.py`'s floor (target weights requiring grad, no optimizer).
So gpart - no_build is the cost of building W_eff, no_build - no_work the grouped sum, and no_work - floor what is
left (the Functions' Python, the once-per-step scaling of ∂L/∂θ, θ's optimizer step). The stubbed variants train
nothing useful: they exist only to time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402  (the benchmark's model, presets, methods and step)

from gpart_cli.kernels import cpu_native  # noqa: E402
from gpart_cli.kernels import delta_ops as groups  # noqa: E402


def _no_build(self, weight, theta_s, **kwargs):
    return weight


def _no_grouped_sum(self, rows, gy, x, transposed, dropout=None, **kwargs):
    groups._weight_grad(gy, x, transposed)  # keep the ∂L/∂W GEMM the floor computes too


REAL = (groups.LayerGroups.build, groups.LayerGroups.add_weight_grad)
VARIANTS = {"gpart": REAL, "no_build": (_no_build, REAL[1]), "no_work": (_no_build, _no_grouped_sum), "floor": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(step_time.PRESETS), default="small")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    cli = p.parse_args()
    extra = ["--seq", str(cli.seq)] if cli.seq else []
    args = step_time.parse_args(["--preset", cli.preset, "--device", "cpu", *extra])  # its model, targets, d, batch
    step_time.cpu_allocator(args)
    base = step_time.build_base(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    runs = {name: step_time.prepare("floor" if name == "floor" else "gpart", base, args) for name in VARIANTS}

    def timed(name: str) -> float:
        if VARIANTS[name] is not None:
            groups.LayerGroups.build, groups.LayerGroups.add_weight_grad = VARIANTS[name]
        tick = time.perf_counter()
        step_time.step(*runs[name], batch, args)
        return time.perf_counter() - tick

    names = list(VARIANTS)
    for name in names:
        timed(name), timed(name)  # warm-up
    times = {name: [] for name in names}
    for r in range(cli.rounds):  # the order rotates round by round
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(name))
    groups.LayerGroups.build, groups.LayerGroups.add_weight_grad = REAL
    ratio = {n: statistics.median(a / b for a, b in zip(times[n], times["floor"])) for n in names}
    print(json.dumps({"preset": cli.preset, "tokens_per_step": args.batch * args.seq, "rounds": cli.rounds, "gpart_cpu_ops": cpu_native.describe(),
                      "floor_step_s": round(statistics.median(times["floor"]), 4),
                      "ratio_to_floor": {n: round(v, 4) for n, v in ratio.items()},
                      "share_of_floor_step": {"build_w_eff": round(ratio["gpart"] - ratio["no_build"], 4),
                                              "grouped_sum": round(ratio["no_build"] - ratio["no_work"], 4),
                                              "rest": round(ratio["no_work"] - 1, 4)}}, indent=2))


if __name__ == "__main__":
    main()
