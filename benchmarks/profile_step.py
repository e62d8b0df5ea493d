"""Where the time of one GPart training step goes: torch.profiler's top operators, as JSON and a table.

    python benchmarks/profile_step.py                 # preset medium: Llama 512x8, q/k/v/o, d=65,536, 4x256, CPU
    python benchmarks/profile_step.py --method floor  # the same for the floor, to compare
    python benchmarks/profile_step.py --preset small  # any step_time.py flag works (--threads, --dropout, ...)
"""

from __future__ import annotations

import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from step_time import build_base, parse_args, prepare, step  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    method = "gpart"
    if "--method" in argv:
        i = argv.index("--method")
        method = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    args = parse_args(argv)
    model, optimizer = prepare(method, build_base(args), args, copy_base=False)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = batch.to(args.device)
    for _ in range(args.warmup):
        step(model, optimizer, batch, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step(model, optimizer, batch, args)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    top = [{"op": e.key, "calls": e.count, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
           for e in events[:15]]
    print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
    print(json.dumps({"method": method, "total_ms": total / 1e3, "top": top}, indent=2))


if __name__ == "__main__":
    main()
