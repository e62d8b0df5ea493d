"""A GPU smoke run of the user path: train, eval, merge of a tiny Qwen2-config model, in minutes, offline.

    python benchmarks/gpu_check.py                  # on a CUDA machine: bf16 weights and autocast on the GPU
    python benchmarks/gpu_check.py --device cpu     # the same path on the CPU, fp32 (what CI runs)

Builds a 2-layer Qwen2 (rope_theta 1e6) and a byte-level BPE tokenizer in-process (nothing is downloaded), then runs
what `gpart train` / `gpart eval` / `gpart merge` run, through the same functions:
  1. train: a few GPart SFT steps (gradient checkpointing, dev loss, end-of-training GSM8K-format eval);
  2. eval:  `gpart eval --task gsm8k --adapter RUN` (generation) in the run's precision;
  3. merge: `gpart merge` on the device, then reload: config.json carries rope_theta/torch_dtype, logits match.
Each stage reports where it ran, in which dtype, its wall time and (on CUDA) peak GPU memory. On a machine without
CUDA the GPU-only checks are listed as skipped. Prints one JSON object on stdout (exit 1 if a check failed).

Other GPU checks (Triton kernels against the reference path, vLLM loading of the merged dir, ...) plug in through
`register_check` below: see "Hook: more GPU checks". Those of issue 20 confirm on the GPU what CPU tests check of the
GPU paths: dropout masks hashed on the device, merged decoding bit for bit, one host sync per step, the vLLM merge on
the device, and (2 GPUs) FSDP's per-rank memory, the sharded generation eval under NCCL and a clean teardown. With 2
GPUs, `multi_gpu_fsdp_tied` trains a model with tied embeddings under FSDP to the θ of one GPU (issue 27);
`vllm_weight_push` pushes GRPO's merged weights into a running vLLM engine (issue 29).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars would bury the report (read when tqdm is imported)

# ---- Hook: more GPU checks ---------------------------------------------------------------------------------------
# A check is `fn(ctx) -> dict` and runs after train/eval/merge with `ctx` = {"device": torch.device, "work": Path,
# "model_dir": Path (base), "run_dir": Path, "merged_dir": Path, "cuda": bool}. Return {"ok": bool, ...details};
# return {"skipped": "why"} when it cannot run here (e.g. no CUDA, vLLM not installed). Register it with
# `@register_check("name")` in this file (or in a module imported before `main`).
EXTRA_CHECKS: dict[str, Callable[[dict], dict]] = {}


def register_check(name: str):
    def add(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        EXTRA_CHECKS[name] = fn
        return fn
    return add
# -------------------------------------------------------------------------------------------------------------------


def _rows(n: int, seed: int) -> list[dict]:
    """GSM8K-format arithmetic problems: {"question", "answer" ending in "#### N"}."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in torch.randint(2, 50, (n, 2), generator=g).tolist():
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                     "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"})
    return rows


def byte_bpe_tokenizer(texts: list[str], vocab_size: int, **special: str):
    """A fast tokenizer with a byte-level BPE trained on `texts`. `special` maps roles to tokens
    (eos_token="</s>", ...); the distinct tokens get the first ids, in the order given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(special.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def build_model(out: Path, tied: bool = False) -> Path:
    """A 2-layer Qwen2 (rope_theta 1e6, as Qwen2.5) and its tokenizer, saved to `out`; `tied`: its output layer is
    its input embedding, as in Qwen2.5-0.5B/3B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gpart_cli.data.sft import format_prompt

    texts = [format_prompt(r["question"], for_eval=True) + " " + r["answer"] for r in _rows(200, 1)]
    fast = byte_bpe_tokenizer(texts, 600, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(fast), max_position_embeddings=512, rope_theta=1e6,
                         eos_token_id=0, pad_token_id=0, bos_token_id=None, tie_word_embeddings=tied)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _timed(device: torch.device, fn):
    """(result, seconds, peak CUDA MiB or None) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return result, time.perf_counter() - start, None if peak is None else round(peak, 1)


def check_train(ctx: dict, steps: int) -> dict:
    from gpart_cli.recipe.schema import from_dict
    from gpart_cli.train.run import run

    cuda = ctx["cuda"]
    recipe = from_dict({
        "model": {"name_or_path": str(ctx["model_dir"]), "dtype": "bfloat16" if cuda else "float32"},
        "method": {"name": "gpart", "d": 512, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"family": "sft", "task": "gsm8k", "train_files": [str(ctx["train_file"])], "query_column": "question",
                 "response_column": "answer", "dev_samples": 8, "max_length": 256},
        "train": {"max_steps": steps, "batch_size": 4, "grad_accum": 2, "lr_theta": 1e-2, "eval_before": False,
                  "gradient_checkpointing": True, "precision": "bf16" if cuda else "fp32", "log_every": 1},
        "eval": {"task": "gsm8k", "files": [str(ctx["test_file"])], "limit": 8, "batch_size": 4, "max_new_tokens": 16},
        "name": "gpu-check"})
    results, seconds, peak = _timed(ctx["device"], lambda: run(recipe, ctx["run_dir"], overwrite=True,
                                                              device=str(ctx["device"])))
    logs = [json.loads(x) for x in (ctx["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    from gpart_cli.core.artifact import read_artifact

    theta = read_artifact(ctx["run_dir"] / "adapter.gpart").theta
    ok = len(losses) == steps and all(map(_finite, losses)) and bool(theta.abs().sum() > 0)
    return {"ok": ok, "device": str(ctx["device"]), "weights": recipe.model.dtype,
            "autocast": "bfloat16" if cuda else None, "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
            "dev_loss": (results["best_dev"] or {}).get("loss"), "theta_dtype": str(theta.dtype).removeprefix("torch."),
            "seconds": round(seconds, 2), "peak_gpu_mib": peak}


def _finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


def check_eval(ctx: dict) -> dict:
    from gpart_cli.adapters.reference import open_adapter
    from gpart_cli.evaluation.runner import EvalRequest, evaluate

    req = EvalRequest(task="gsm8k", adapter=open_adapter(ctx["run_dir"]), model=str(ctx["model_dir"]),
                      data=[str(ctx["test_file"])], limit=8, batch_size=4, max_new_tokens=16, output=ctx["work"] / "eval-gsm8k.json",
                      device=str(ctx["device"]))
    doc, seconds, peak = _timed(ctx["device"], lambda: evaluate(req))
    expected = "bfloat16" if ctx["cuda"] else "float32"
    ok = doc["device"] == str(ctx["device"]) and doc["dtype"] == expected and doc["scores"]["n"] == 8
    return {"ok": ok, "device": doc["device"], "weights": doc["dtype"], "autocast": doc["autocast"],
            "max_new_tokens": doc["max_new_tokens"], "batch_size": doc["batch_size"], "scores": doc["scores"],
            "seconds": round(seconds, 2), "peak_gpu_mib": peak}


def check_merge(ctx: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from gpart_cli.adapters.merged_dir import merge_to_dir
    from gpart_cli.adapters.reference import load_adapted

    adapter = ctx["run_dir"] / "adapter.gpart"
    _, seconds, peak = _timed(ctx["device"], lambda: merge_to_dir(str(ctx["model_dir"]), adapter, ctx["merged_dir"],
                                                                  device=ctx["device"]))
    config = json.loads((ctx["merged_dir"] / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(ctx["merged_dir"]).to(ctx["device"]).eval()
    adapted, _, _ = load_adapted(str(ctx["model_dir"]), adapter, str(config.get("torch_dtype")), device=ctx["device"])
    ids = torch.arange(3, 40, device=ctx["device"])[None]
    with torch.no_grad():
        diff = float((merged(ids).logits.float() - adapted.eval()(ids).logits.float()).abs().max())
    ok = config.get("rope_theta") == 1e6 and config.get("torch_dtype") is not None and diff < 1e-2
    return {"ok": ok, "device": str(ctx["device"]), "dtype": config.get("torch_dtype"),
            "rope_theta": config.get("rope_theta"), "max_logit_diff_vs_adapter": diff, "seconds": round(seconds, 2),
            "peak_gpu_mib": peak}


# ---- Issue 20: what only a GPU can confirm of the CPU-tested GPU paths ----------------------------------------------


@register_check("dropout_masks_on_device")
def check_dropout_masks(ctx: dict) -> dict:
    """ΔW-dropout masks hashed on the GPU with torch integer ops: the same bits as the CPU's NumPy hash."""
    if not ctx["cuda"]:
        return {"skipped": "no CUDA: the torch hash is checked against NumPy on the CPU in tests/core/test_dropout.py"}
    from gpart_cli import rng

    key, thr, start, n = rng.micro_batch_key(0, 7), rng.drop_threshold(0.05), 2**32 - 1000, 3_000_000
    gpu, seconds, peak = _timed(ctx["device"], lambda: rng.drop_mask(start, n, key, thr, ctx["device"]))
    same = torch.equal(gpu.cpu(), rng.drop_mask(start, n, key, thr))
    return {"ok": same and gpu.device.type == "cuda", "weights": n, "seconds": round(seconds, 4),
            "peak_gpu_mib": peak}


@register_check("merged_decoding")
def check_merged_decoding(ctx: dict) -> dict:
    """Decoding merged (W_eff built once) gives the unmerged logits bit for bit in the run's precision (cuBLAS)."""
    from gpart_cli.adapters.reference import load_adapted
    from gpart_cli.core.model import GPartLinear, merged_for_decoding

    dtype = "bfloat16" if ctx["cuda"] else "float32"
    model, _, _ = load_adapted(str(ctx["model_dir"]), ctx["run_dir"] / "adapter.gpart", dtype, device=ctx["device"])
    model.eval()
    ids = torch.arange(3, 40, device=ctx["device"])[None]
    with torch.no_grad():
        unmerged = model(ids).logits
        with merged_for_decoding(model):
            merged = model(ids).logits
    back = any(isinstance(m, GPartLinear) for m in model.modules())
    return {"ok": torch.equal(merged, unmerged) and back, "dtype": dtype, "layers_restored": back}


@register_check("host_syncs_per_step")
def check_host_syncs(ctx: dict) -> dict:
    """One device-to-host sync per optimizer step from gpart's own code (CUDA's sync debug mode names the callers)."""
    if not ctx["cuda"]:
        return {"skipped": "no CUDA: the host reads are counted on the CPU in tests/core/test_host_syncs.py"}
    import warnings

    from gpart_cli.recipe.schema import from_dict
    from gpart_cli.train.trainer import Trainer

    recipe = from_dict({
        "model": {"name_or_path": str(ctx["model_dir"]), "dtype": "bfloat16"},
        "method": {"name": "gpart", "d": 512, "target_modules": ["q_proj", "v_proj"], "dropout": 0.05},
        "data": {"family": "sft", "task": "gsm8k", "train_files": [str(ctx["train_file"])], "query_column": "question",
                 "response_column": "answer", "max_length": 256},
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "precision": "bf16"}, "name": "syncs"})
    trainer = Trainer(recipe, ctx["work"] / "syncs", device=str(ctx["device"]))
    trainer.setup()
    trainer._train_step(0)  # first use builds the layers' caches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in (1, 2, 3):
                trainer._train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "gpart_cli" in w.filename]
    return {"ok": len(ours) <= 3, "gpart_syncs_in_3_steps": len(ours), "where": sorted(set(ours)),
            "all_syncs_in_3_steps": len(caught)}


@register_check("vllm_merge_on_device")
def check_vllm_merge(ctx: dict) -> dict:
    """`gpart eval --backend vllm` merges the adapter on --device in vLLM's dtype into --merged-dir."""
    import shutil

    from gpart_cli.adapters.devices import eval_precision
    from gpart_cli.adapters.reference import open_adapter
    from gpart_cli.evaluation import vllm_backend
    from gpart_cli.evaluation.runner import EvalRequest

    out = ctx["work"] / "vllm-merged"
    shutil.rmtree(out, ignore_errors=True)  # --merged-dir refuses a dir that holds files
    ref = open_adapter(ctx["run_dir"])
    req = EvalRequest(task="gsm8k", adapter=ref, model=str(ctx["model_dir"]), backend="vllm", merged_dir=out,
                      device=str(ctx["device"]))
    precision = eval_precision(ctx["device"], ref.recipe)

    def merge():
        with vllm_backend.model_dir(req, ref, precision, ctx["device"]) as path:
            return json.loads((path / "config.json").read_text())

    config, seconds, peak = _timed(ctx["device"], merge)
    dtype = config.get("dtype") or config.get("torch_dtype")
    want = vllm_backend.vllm_dtype(precision)
    free = round(torch.cuda.mem_get_info()[0] / 2**20) if ctx["cuda"] else None  # released for vLLM's KV cache
    return {"ok": dtype == want, "dtype": dtype, "vllm_dtype": want, "seconds": round(seconds, 2),
            "peak_gpu_mib": peak, "gpu_free_after_mib": free}


@register_check("vllm_weight_push")
def check_vllm_weight_push(ctx: dict) -> dict:
    """GRPO's rollout engine gets the merged adapted weights (TRL's sync_weights through gpart's hook): greedy vLLM
    tokens equal those of the `gpart merge` dir in transformers, and the push adds at most one merged layer of GPU
    memory (no second copy of the base)."""
    if not ctx["cuda"]:
        return {"skipped": "needs CUDA (tests/train/test_vllm_sync.py checks names, shapes and values on the CPU)"}
    try:
        from trl.generation.vllm_generation import VLLMGeneration
        from vllm import LLM, SamplingParams
    except ImportError as e:
        return {"skipped": f"needs vLLM and TRL ({e})"}
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from gpart_cli.adapters.reference import load_adapted
    from gpart_cli.train.vllm_sync import push_merged_weights

    model, _, _ = load_adapted(str(ctx["model_dir"]), ctx["run_dir"] / "adapter.gpart", "bfloat16",
                               device=ctx["device"])
    llm = LLM(str(ctx["model_dir"]), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    generation = object.__new__(VLLMGeneration)  # TRL's sync_weights, without TRL starting its own engine
    generation.mode, generation.enable_sleep_mode, generation.llm = "colocate", False, llm
    generation.accelerator, generation._weight_metadata = SimpleNamespace(is_main_process=True), None
    push_merged_weights(generation, model)
    largest = max(layer.base_layer.weight.numel() * 2 for layer in
                  (m for m in model.modules() if type(m).__name__ == "GPartLinear"))
    _, seconds, peak = _timed(ctx["device"], generation.sync_weights)
    prompts = [[3 + i, 17, 40 + i] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    pushed = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    merged = AutoModelForCausalLM.from_pretrained(ctx["merged_dir"], dtype=torch.bfloat16).to(ctx["device"])
    expected = [merged.generate(torch.tensor([p], device=ctx["device"]), max_new_tokens=8, do_sample=False,
                                min_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    agree = sum(a == b for a, b in zip(pushed, expected))
    return {"ok": agree >= 3, "prompts_equal": f"{agree}/4", "sync_seconds": round(seconds, 3),
            "peak_gpu_mib_during_sync": peak, "largest_layer_mib": round(largest / 2**20, 2)}


MULTI_GPU_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from gpart_cli.recipe.schema import load_recipe
from gpart_cli.train import fsdp
from gpart_cli.train.trainer import Trainer
trainer = Trainer(load_recipe(sys.argv[1]), sys.argv[2])
torch.cuda.reset_peak_memory_stats()
trainer.setup()
keep = fsdp.replicated(trainer.model)
world = dist.get_world_size()
share = sum(-(-p.shape[0] // world) * p[0].numel() * p.element_size()
            for p in trainer.model.parameters() if p not in keep)
largest = max(p.numel() * p.element_size() for p in trainer.model.parameters())
print(json.dumps({"rank": dist.get_rank(), "peak": torch.cuda.max_memory_allocated(), "share": share,
                  "replicated": sum(p.numel() * p.element_size() for p in keep), "largest": largest}), flush=True)
trainer.release()
dist.destroy_process_group()
"""


@register_check("multi_gpu_fsdp_and_sharded_eval")
def check_multi_gpu(ctx: dict) -> dict:
    """Under torchrun on 2 GPUs (NCCL): FSDP setup peaks at a rank's share of the base plus one tensor in flight; a
    DDP run shares its GSM8K eval over the ranks and both exit cleanly (no teardown abort)."""
    if not ctx["cuda"] or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 CUDA GPUs (gloo runs of the same code: tests/train/test_ddp.py)"}
    import subprocess

    import yaml

    from gpart_cli.recipe.schema import from_dict

    raw = {"model": {"name_or_path": str(ctx["model_dir"]), "dtype": "bfloat16"},
           "method": {"name": "gpart", "d": 512, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "data": {"family": "sft", "task": "gsm8k", "train_files": [str(ctx["train_file"])],
                    "query_column": "question", "response_column": "answer", "dev_samples": 8, "max_length": 256},
           "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 2, "precision": "bf16", "eval_before": True},
           "eval": {"task": "gsm8k", "files": [str(ctx["test_file"])], "limit": 8, "batch_size": 2,
                    "max_new_tokens": 16}, "name": "multi"}
    recipe = ctx["work"] / "multi.yaml"
    recipe.write_text(yaml.safe_dump(from_dict(raw).to_dict()))
    fsdp_recipe = ctx["work"] / "multi-fsdp.yaml"
    fsdp_raw = {**raw, "train": {**raw["train"], "distributed": "fsdp"}}
    fsdp_recipe.write_text(yaml.safe_dump(from_dict(fsdp_raw).to_dict()))
    script = ctx["work"] / "multi_gpu.py"
    script.write_text(MULTI_GPU_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    placed = subprocess.run([*launch, str(script), str(fsdp_recipe), str(ctx["work"] / "multi-fsdp")],
                            capture_output=True, text=True, timeout=600)
    ranks = [json.loads(line) for line in placed.stdout.splitlines() if line.startswith("{")]
    ddp = subprocess.run([*launch, "-m", "gpart_cli", "train", str(recipe), "--output", str(ctx["work"] / "multi-ddp"),
                          "--overwrite"], capture_output=True, text=True, timeout=600)
    results = ctx["work"] / "multi-ddp" / "results.json"
    after = json.loads(results.read_text())["after"] if results.is_file() else None
    clean = all(p.returncode == 0 and "terminate called" not in p.stderr for p in (placed, ddp))
    bounded = len(ranks) == 2 and all(r["peak"] <= r["share"] + r["replicated"] + 2 * r["largest"] + 2**24
                                      for r in ranks)
    return {"ok": clean and bounded and bool(after) and after.get("n") == 8, "fsdp_ranks": ranks,
            "ddp_after": after, "stderr_tail": (placed.stderr + ddp.stderr)[-1500:] if not clean else ""}


@register_check("multi_gpu_fsdp_tied")
def check_fsdp_tied(ctx: dict) -> dict:
    """Under torchrun on 2 GPUs (NCCL): `gpart train` with FSDP on a model whose output layer is its input embedding
    (Qwen2.5-0.5B/3B, Gemma, SmolLM2), with the authors' splitmix64-mod-v1 partition, ends at the θ of one GPU. In
    fp32, so that only the reduction order differs. A rank that shards other units than rank 0 would hang NCCL:
    GPART_DIST_TIMEOUT bounds the wait."""
    if not ctx["cuda"] or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 CUDA GPUs (gloo runs of the same code: tests/train/test_fsdp_placement.py)"}
    import subprocess

    import yaml

    from gpart_cli.core.artifact import read_artifact
    from gpart_cli.recipe.schema import from_dict

    raw = {"model": {"name_or_path": str(build_model(ctx["work"] / "qwen2-tied", tied=True))},
           "method": {"name": "gpart", "d": 512, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                      "partition": "splitmix64-mod-v1", "seed": 2**63 + 11},
           "data": {"family": "sft", "task": "gsm8k", "train_files": [str(ctx["train_file"])],
                    "query_column": "question", "response_column": "answer", "dev_samples": 8, "max_length": 256},
           "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "precision": "fp32", "eval_before": False,
                     "distributed": "fsdp"}, "name": "tied"}
    recipe = ctx["work"] / "tied.yaml"
    recipe.write_text(yaml.safe_dump(from_dict(raw).to_dict()))
    train = [sys.executable, "-m", "gpart_cli", "train", str(recipe), "--overwrite", "--output"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", *train[2:]]
    env = {**os.environ, "GPART_DIST_TIMEOUT": "300"}
    try:
        runs = [subprocess.run([*train, str(ctx["work"] / "tied-one"), "--device", "cuda:0"], capture_output=True,
                               text=True, timeout=900, env=env),
                subprocess.run([*launch, str(ctx["work"] / "tied-fsdp")], capture_output=True, text=True, timeout=900,
                               env=env)]
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {e.timeout} s: {' '.join(map(str, e.cmd))}"}
    if not all(p.returncode == 0 and "terminate called" not in p.stderr for p in runs):
        return {"ok": False, "stderr_tail": "".join(p.stderr for p in runs)[-1500:]}
    one, two = (read_artifact(ctx["work"] / d / "adapter.gpart").theta for d in ("tied-one", "tied-fsdp"))
    relative = float((two - one).norm() / one.norm().clamp(min=1e-30))
    return {"ok": relative < 1e-3 and bool(one.abs().sum() > 0), "theta_relative_diff": relative,
            "theta_max_abs_diff": float((two - one).abs().max())}


def environment(device: torch.device) -> dict:
    import importlib.util

    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "device": str(device), "triton": importlib.util.find_spec("triton") is not None}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), bf16=torch.cuda.is_bf16_supported(),
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the training check")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default: a temporary one)")
    args = parser.parse_args(argv)

    from gpart_cli.adapters.devices import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpart-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = {"device": device, "cuda": cuda, "work": work, "model_dir": build_model(work / "qwen2-tiny"),
               "run_dir": work / "run", "merged_dir": work / "merged",
               "train_file": _write_jsonl(work / "train.jsonl", _rows(64, 2)),
               "test_file": _write_jsonl(work / "test.jsonl", _rows(8, 3))}
        report = {"environment": environment(device), "checks": {}, "skipped": []}
        if not cuda:
            report["skipped"] += ["bf16 weights and autocast on a GPU (ran fp32 on the CPU instead)",
                                  "peak GPU memory", "Triton kernels on CUDA (GPART_TRITON)"]
        stages = [("train", lambda c: check_train(c, args.steps)), ("eval", check_eval), ("merge", check_merge),
                  *EXTRA_CHECKS.items()]
        for name, fn in stages:
            result = fn(ctx)
            report["checks"][name] = result
            if "skipped" in result:
                report["skipped"].append(f"{name}: {result['skipped']}")
            print(f"{name:>6}: {'ok' if result.get('ok') else ('skipped' if 'skipped' in result else 'FAILED')} "
                  f"{json.dumps({k: v for k, v in result.items() if k != 'ok'})}", file=sys.stderr)
    for line in report["skipped"]:
        print(f"skipped: {line}", file=sys.stderr)
    report["ok"] = all(r.get("ok", "skipped" in r) for r in report["checks"].values())
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
