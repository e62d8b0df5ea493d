"""Per-GPU memory of GPart SFT under DDP, FSDP and an nf4 base, from parameter and activation counts (estimates).

    python benchmarks/memory_estimate.py                       # MetaMath recipe: micro-batch 2 x 2,048 tokens, 8 GPUs
    python benchmarks/memory_estimate.py --gpus 16 --micro-batch 1 --markdown

Every term is arithmetic on the model's config, not a measurement (no GPU was available to measure); the docs/gpu.md
table is this script's output. Bytes per GPU, with t = micro-batch x sequence tokens, bf16 weights and activations,
gradient checkpointing on (as the MetaMath recipes set), N GPUs:

  weights   DDP: 2P              FSDP: 2P/N + 2 x 2·max(block, V·h)   (the shard, plus the unit in use and the
                                                                        next one, prefetched)
            nf4: 0.5625·P_lin (4 bits + one fp32 absmax per 64) + 2·(P - P_lin), the bf16 rest (embeddings, head,
                 norms) sharded under FSDP; the nf4 weights stay whole on every GPU (see docs/gpu.md)
  theta     16·d                 (θ, its gradient, AdamW's two moments, fp32)
  act       2·t·h·L + t·(20h + 8I)    (each block's checkpointed input, and one block recomputed in backward:
                                       q/k/v/attention/o inputs, fp32 norm inputs, SwiGLU's gate/up/product)
  logits    10·t·V               (bf16 logits, their fp32 copy for the loss and its fp32 gradient)
  fixed     3 GiB                (CUDA context, NCCL buffers, allocator slack)

A configuration "fits" when the total is at most 90% of the GPU (the rest is left to fragmentation).
"""

from __future__ import annotations

import argparse
import json

GIB = 2 ** 30
# (hidden h, layers L, intermediate I, vocab V, attention heads, kv heads, head dim, tied embeddings)
MODELS = {
    "Qwen2.5-0.5B": (896, 24, 4864, 151936, 14, 2, 64, True),
    "Qwen2.5-3B": (2048, 36, 11008, 151936, 16, 2, 128, True),
    "Qwen2.5-7B": (3584, 28, 18944, 152064, 28, 4, 128, False),
    "Llama-3.1-8B": (4096, 32, 14336, 128256, 32, 8, 128, False),
    "Gemma-7B": (3072, 28, 24576, 256000, 16, 16, 256, True),
    "Qwen2.5-14B": (5120, 48, 13824, 152064, 40, 8, 128, False),
    "Qwen2.5-32B": (5120, 64, 27648, 152064, 40, 8, 128, False),
    "Llama-3.1-70B": (8192, 80, 28672, 128256, 64, 8, 128, False),
    "Qwen2.5-72B": (8192, 80, 29568, 152064, 64, 8, 128, False),
    "Llama-3.1-405B": (16384, 126, 53248, 128256, 128, 8, 128, False),
}
D = 524_288  # the paper's d for the 3B-8B MetaMath runs


def params(h, layers, inter, vocab, heads, kv_heads, head_dim, tied) -> dict:
    """Parameter counts: linear weights of one block, the whole model, and the linear part nf4 quantizes."""
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o and k, v
    block_linear = attn + 3 * h * inter
    embed = vocab * h * (1 if tied else 2)
    total = layers * (block_linear + 2 * h) + embed + h
    return {"block": block_linear + 2 * h, "linear": layers * block_linear, "total": total, "embed_one": vocab * h}


def estimate(name: str, gpus: int, tokens: int) -> dict:
    h, layers, inter, vocab, heads, kv_heads, head_dim, tied = MODELS[name]
    p = params(h, layers, inter, vocab, heads, kv_heads, head_dim, tied)
    gathered = 2 * 2 * max(p["block"], p["embed_one"])
    rest = p["total"] - p["linear"]
    weights = {"ddp": 2 * p["total"], "fsdp": 2 * p["total"] / gpus + gathered,
               "ddp_nf4": 0.5625 * p["linear"] + 2 * rest,
               "fsdp_nf4": 0.5625 * p["linear"] + 2 * rest / gpus + 2 * 2 * p["embed_one"]}
    common = 16 * D + 2 * tokens * h * layers + tokens * (20 * h + 8 * inter) + 10 * tokens * vocab + 3 * GIB
    total = {k: (w + common) / GIB for k, w in weights.items()}
    return {"model": name, "params_b": round(p["total"] / 1e9, 2), "gib_per_gpu": {k: round(v, 1) for k, v in total.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--micro-batch", type=int, default=2, help="per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--markdown", action="store_true", help="a README table instead of JSON")
    args = parser.parse_args()
    budget = 0.9 * args.gpu_gib * 2 ** 30 / GIB
    rows = [estimate(name, args.gpus, args.micro_batch * args.seq) for name in MODELS]
    for row in rows:
        row["fits"] = {k: v <= budget for k, v in row["gib_per_gpu"].items()}
    if not args.markdown:
        print(json.dumps({"gpus": args.gpus, "gpu_gib": args.gpu_gib, "micro_batch": args.micro_batch,
                          "seq": args.seq, "budget_gib": budget, "rows": rows}, indent=2))
        return
    print("| model | params | DDP | FSDP | DDP + nf4 | FSDP + nf4 |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [f"{row['gib_per_gpu'][k]:.1f}" + ("" if row["fits"][k] else " ✗")
                 for k in ("ddp", "fsdp", "ddp_nf4", "fsdp_nf4")]
        print(f"| {row['model']} | {row['params_b']}B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
