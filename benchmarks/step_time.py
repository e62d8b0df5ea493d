"""Step time and peak memory of GPart against its physical floor, PEFT LoRA, PEFT Uni-LoRA and full fine-tuning.

    python benchmarks/step_time.py                      # preset medium: Llama 512x8, q/k/v/o, d=65,536, 4x256
    python benchmarks/step_time.py --preset small       # Llama 384x8, q/k/v/o, d=65,536, 2x384 (few tokens/step)
    python benchmarks/step_time.py --preset compact     # Llama 384x6, q/k/v/o, d=65,536, 2x448 (896 tokens/step)
    python benchmarks/step_time.py --model tiny --d 4096 --steps 3
    python benchmarks/step_time.py --device cuda --dtype bf16 --model 1b --seq 2048 --batch 1

Floor: the same model with only the target weights requiring grad, forward + backward, no optimizer step: the
dense dL/dW that any random-partition method must compute. Timing interleaves the methods (A B C A B C ...)
after warm-up in one process; ratios are taken pair by pair within a round, then the median. Peak memory runs
each method in its own child processes (CPU: peak RSS, median of 3, and the peak of tensor storage alive at once,
which unlike RSS is the same on every run; GPU: torch.cuda.max_memory_allocated). On the CPU every
method runs under the allocator thresholds `gpart train` sets (`gpart_cli/train/cpu_alloc.py`: freed blocks are
reused instead of page-faulted afresh each step); `--default-alloc` measures glibc's defaults.

Prints one JSON object on stdout and a Rich table on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpart_cli.kernels import cpu_native

METHODS = ("gpart", "floor", "lora", "unilora", "full")
MODELS = {  # Llama configs built from scratch (random weights are fine for timing)
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "w384": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6),
    "w384l6": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6),
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}


# Named CPU configurations (in docs/performance.md's table): `small` has fewer tokens per step than `medium`, so
# the per-weight work (building W_eff, reducing ∂L/∂W into ∂L/∂θ) weighs more against the GEMMs; `compact` fewer
# still (896 tokens over 6 layers): the shape where the per-weight and per-call costs weigh most.
PRESETS = {
    "medium": dict(model="medium", batch=4, seq=256, d=65_536),
    "small": dict(model="w384", batch=2, seq=384, d=65_536),
    "compact": dict(model="w384l6", batch=2, seq=448, d=65_536),
}


def build_base(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model in MODELS:
        cfg = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=max(args.seq, 128), **MODELS[args.model])
        model = LlamaForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    return model.to(dtype=DTYPES[args.dtype], device=args.device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _is_target(name: str, targets: list[str]) -> bool:
    return any(name.endswith(f".{t}.weight") for t in targets)


def prepare(method: str, base, args, copy_base: bool = True):
    """(model, optimizer or None) for one method."""
    import gpart_cli as gpart

    model = copy.deepcopy(base) if copy_base else base
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "gpart":
        extra = {"dropout": args.dropout} if args.dropout else {}  # older gpart versions lack the field
        model = gpart.apply(model, gpart.GPartConfig(d=args.d, target_modules=args.targets, **extra))
    elif method in ("lora", "unilora"):
        from peft import LoraConfig, UniLoraConfig, get_peft_model

        cfg = (LoraConfig(r=8, lora_alpha=16, target_modules=args.targets, lora_dropout=0.0) if method == "lora"
               else UniLoraConfig(r=4, theta_d_length=args.d, target_modules=args.targets))
        model = get_peft_model(model, cfg)
    elif method in ("floor", "full"):
        for name, p in model.named_parameters():
            p.requires_grad_(_is_target(name, args.targets))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if method == "floor" else torch.optim.AdamW(params, lr=1e-4)
    return model.train(), optimizer


def step(model, optimizer, batch, args) -> None:
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16" and args.device == "cuda"):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    if args.device == "cuda":
        torch.cuda.synchronize()


def partition_state_bytes(model, method: str, n_adapted: int) -> float:
    """Bytes of per-parameter partition/projection state, divided by the adapted parameter count."""
    if method == "gpart":
        from gpart_cli.core.model import gpart_layers

        total = sum(layer.groups.state_bytes() for _, layer in gpart_layers(model))
    elif method == "unilora":
        total = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "unilora" in n.lower())
    else:
        total = 0
    return total / n_adapted


def cpu_allocator(args) -> bool:
    """Run under the allocator settings `gpart train` uses on the CPU, for every method alike."""
    if args.device != "cpu" or args.default_alloc:
        return False
    try:
        from gpart_cli.train.cpu_alloc import keep_freed_memory
    except ImportError:  # a gpart version without it
        return False
    return keep_freed_memory()


def time_methods(args) -> dict:
    cpu_allocator(args)
    base = build_base(args)
    n_adapted = sum(p.numel() for n, p in base.named_parameters() if _is_target(n, args.targets))
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    runs = {m: prepare(m, base, args) for m in args.methods}
    for m in args.methods:
        for _ in range(args.warmup):
            step(*runs[m], batch, args)
    times = {m: [] for m in args.methods}
    cpu = {m: [] for m in args.methods}
    for r in range(args.steps):  # interleaved: each round times every method once; the order rotates
        order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]
        for m in order:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            step(*runs[m], batch, args)
            times[m].append(time.perf_counter() - tick)
            cpu[m].append(time.process_time() - cpu_tick)
    state = {m: partition_state_bytes(runs[m][0], m, n_adapted) for m in args.methods}
    return {"times": times, "cpu_times": cpu, "n_adapted": n_adapted, "state_bytes_per_param": state}


def _run_child(method: str, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, *extra] + [a for a in sys.argv[1:] if a != "--no-memory"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def peak_memory(method: str, args) -> float:
    """Peak memory (MiB) of two steps of one method: the median over `--memory-runs` child processes (a CPU
    process's peak RSS moves by a few percent from run to run with how glibc's arenas fill)."""
    return statistics.median(_run_child(method)["peak_mib"] for _ in range(args.memory_runs))


def peak_tensor_memory(method: str) -> float:
    """CPU: the most MiB of tensor storage alive at once over two steps, created inside them (activations,
    gradients, optimizer state, caches such as GPart's group ids; not the model's weights). It depends only on
    the ops and shapes (`tests/peak_memory.py`), so unlike RSS it is the same on every run: one child suffices."""
    return _run_child(method, "--tensor-bytes")["peak_tensor_mib"]


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process's own address space; ru_maxrss would carry the parent's peak across exec.
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(method: str, args) -> None:
    cpu_allocator(args)
    model, optimizer = prepare(method, build_base(args), args, copy_base=False)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq)).to(args.device)
    if args.tensor_bytes:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.peak_memory import PeakTensorBytes

        with PeakTensorBytes() as tracked:
            for _ in range(2):
                step(model, optimizer, batch, args)
        print(json.dumps({"peak_tensor_mib": tracked.peak / 2**20}))
        return
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(model, optimizer, batch, args)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else _peak_rss_mib())
    print(json.dumps({"peak_mib": peak}))


def ratios(times: dict, a: str, b: str) -> float | None:
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def spread(times: dict, a: str, b: str) -> list[float] | None:
    """Quartiles of the round-by-round ratio a/b: how noisy the machine was."""
    if a not in times or b not in times or len(times[a]) < 4:
        return None
    q = statistics.quantiles([x / y for x, y in zip(times[a], times[b])], n=4)
    return [q[0], q[2]]


def report(args, timed: dict, memory: dict) -> dict:
    times = timed["times"]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "torch": torch.__version__,
                    # how GPart's CPU path ran: gpart_cli/kernels/cpu_native.py (GPART_CPU_KERNEL)
                    "gpart_cpu_ops": cpu_native.describe() if args.device == "cpu" else None},
        "config": {"preset": args.preset, "model": args.model, "targets": args.targets, "d": args.d,
                   "dropout": args.dropout,
                   "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "steps": args.steps,
                   "warmup": args.warmup, "cpu_alloc": cpu_allocator(args)},
        "n_adapted": timed["n_adapted"],
        "median_step_s": {m: statistics.median(t) for m, t in times.items()},
        "ratios": {"gpart/floor": ratios(times, "gpart", "floor"), "gpart/lora": ratios(times, "gpart", "lora"),
                   "gpart/unilora": ratios(times, "gpart", "unilora"), "gpart/full": ratios(times, "gpart", "full")},
        "gpart/floor_quartiles": spread(times, "gpart", "floor"),
        "median_cpu_s": {m: statistics.median(t) for m, t in timed["cpu_times"].items()},
        "cpu_ratio_gpart/floor": ratios(timed["cpu_times"], "gpart", "floor"),
        "times": times,
        "peak_mib": memory["rss"],
        "peak_tensor_mib": memory["tensors"],
        "partition_state_bytes_per_param": timed["state_bytes_per_param"],
    }
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"step time · {result['config']['model']} · {result['machine']['device']} · "
                        f"{result['config']['dtype']}")
    for col in ("method", "median step (s)", "× floor", "peak MiB", "peak tensor MiB", "partition B/param"):
        table.add_column(col, justify="right")
    floor = result["median_step_s"].get("floor")
    for m, t in result["median_step_s"].items():
        table.add_row(m, f"{t:.4f}", f"{t / floor:.3f}" if floor else "-",
                      f"{result['peak_mib'].get(m, float('nan')):.0f}",
                      f"{result['peak_tensor_mib'].get(m, float('nan')):.0f}",
                      f"{result['partition_state_bytes_per_param'][m]:.2f}")
    Console(stderr=True).print(table)
    Console(stderr=True).print({k: (round(v, 4) if v else v) for k, v in result["ratios"].items()})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="medium",
                   help="named configuration (model, batch, seq, d); the flags below override its values")
    p.add_argument("--model", help=f"{', '.join(MODELS)} or a local model dir")
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--d", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--dropout", type=float, default=0.0, help="GPart's ΔW dropout (its CPU cost: the mask hash)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method child processes")
    p.add_argument("--memory-runs", type=int, default=3, help="child processes per method for peak memory")
    p.add_argument("--default-alloc", action="store_true",
                   help="CPU: glibc's default allocator thresholds instead of those `gpart train` sets (cpu_alloc)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--tensor-bytes", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args)
        return
    # Memory first: the children are started while this process is still small.
    memory = {"rss": {}, "tensors": {}}
    if not args.no_memory:
        memory["rss"] = {m: peak_memory(m, args) for m in args.methods}
        if args.device == "cpu":
            memory["tensors"] = {m: peak_tensor_memory(m) for m in args.methods}
    timed = time_methods(args)
    result = report(args, timed, memory)
    print_table(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
