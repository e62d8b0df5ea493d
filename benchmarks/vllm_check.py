"""GPU check: do `gpart eval --backend hf` and `--backend vllm` give the same GSM8K outputs and scores?

    python benchmarks/vllm_check.py                                          # a tiny Llama built from a config
    python benchmarks/vllm_check.py --model Qwen/Qwen2.5-0.5B-Instruct --n 100 --max-new-tokens 512
    python benchmarks/vllm_check.py --data ../shared/assets/gsm8k/test.jsonl  # offline GSM8K file

Both backends run gpart's own code on the first N GSM8K test problems: HF through `tasks.run_generation` (batched
greedy `generate`, left padding, stop strings), vLLM through `vllm_backend.generate` (the same token ids, eos
ids, stop strings and max_new_tokens), each scored by `tasks.score_outputs`, in the same dtype. Greedy decoding in
bf16 can still part ways where two logits nearly tie (the kernels differ), so the check reports the fraction of
identical outputs and both scores, and "agree" is identical_fraction >= --min-identical.

Needs a CUDA device and `pip install 'gpart[vllm]'`; elsewhere it prints what it skipped and why. One JSON object
on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)  # head_dim 64: every vLLM attention kernel takes it


def skipped() -> list[str]:
    """Why this machine cannot run the check (empty when it can)."""
    import importlib.util

    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device: torch.cuda.is_available() is False")
    if importlib.util.find_spec("vllm") is None:
        reasons.append("vLLM is not installed: pip install 'gpart[vllm]'")
    return reasons


def tiny_model_dir(rows: list[dict], out: Path, dtype: torch.dtype) -> str:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the problems themselves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import byte_bpe_tokenizer

    fast = byte_bpe_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], 512, bos_token="<s>",
                              eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                         **TINY))
    model.to(dtype).save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


def run_hf(model_id: str, rows: list[dict], args, dtype: torch.dtype) -> tuple[dict, list[dict], float]:
    from transformers import AutoModelForCausalLM

    from gpart_cli.adapters.loading import ModelSource, load_tokenizer
    from gpart_cli.evaluation.tasks import run_generation

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to("cuda")
    tick = time.perf_counter()
    scores, records = run_generation("gsm8k", model, load_tokenizer(ModelSource(model_id)), rows, args.batch_size,
                                     args.max_new_tokens)
    seconds = time.perf_counter() - tick
    del model
    torch.cuda.empty_cache()  # leave the GPU to vLLM
    return scores, records, seconds


def run_vllm(model_id: str, rows: list[dict], args) -> tuple[dict, list[dict], float]:
    from gpart_cli.evaluation import vllm_backend
    from gpart_cli.evaluation.generate import MATH_STOPS
    from gpart_cli.evaluation.tasks import prompts_for, score_outputs

    tick = time.perf_counter()
    outputs = vllm_backend.generate(model_id, prompts_for("gsm8k", rows), max_new_tokens=args.max_new_tokens,
                                    stop=MATH_STOPS, dtype=args.dtype)
    seconds = time.perf_counter() - tick
    return (*score_outputs("gsm8k", rows, outputs), seconds)


def compare(hf: list[dict], vllm: list[dict]) -> dict:
    same = [a["output"] == b["output"] for a, b in zip(hf, vllm)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"identical": sum(same), "identical_fraction": sum(same) / max(len(same), 1),
            "first_difference": None if first is None else {"idx": first, "hf": hf[first]["output"],
                                                            "vllm": vllm[first]["output"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or model dir (default: a tiny Llama built from a config)")
    parser.add_argument("--data", nargs="*", help="GSM8K jsonl file(s) (default: openai/gsm8k test on the hub)")
    parser.add_argument("--n", type=int, default=50, help="first N test problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="HF backend batch size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--min-identical", type=float, default=0.9)
    args = parser.parse_args()
    reasons = skipped()
    if reasons:
        print(json.dumps({"ran": False, "skipped": "HF vs vLLM generation agreement on GSM8K", "why": reasons}))
        return
    from gpart_cli.evaluation.tasks import load_task_rows

    rows = load_task_rows("gsm8k", args.data, None, args.n)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="gpart-vllm-check-") as tmp:
        model_id = args.model or tiny_model_dir(rows, Path(tmp) / "tiny", dtype)
        hf_scores, hf_records, hf_s = run_hf(model_id, rows, args, dtype)
        vllm_scores, vllm_records, vllm_s = run_vllm(model_id, rows, args)
    report = {"ran": True, "model": args.model or f"tiny Llama {TINY}", "n": len(rows), "dtype": args.dtype,
              "max_new_tokens": args.max_new_tokens, "device": torch.cuda.get_device_name(),
              "hf": {"scores": hf_scores, "seconds": round(hf_s, 2)},
              "vllm": {"scores": vllm_scores, "seconds": round(vllm_s, 2)}, **compare(hf_records, vllm_records)}
    report["agree"] = report["identical_fraction"] >= args.min_identical
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["agree"] else 1)


if __name__ == "__main__":
    main()
