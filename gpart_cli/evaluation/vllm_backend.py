"""`gpart eval --backend vllm`: the generation tasks (GSM8K, MATH, MAWPS) decoded by vLLM instead of HF `generate`.

Everything but the decoding loop is the HF path's: the same prompts tokenized by the same tokenizer call (vLLM
receives token ids, so both backends start from identical inputs), greedy decoding, the same eos ids, stop
strings and `max_new_tokens`, the new tokens decoded by the HF tokenizer and cut at the first stop string, and the
same scoring and predictions JSONL. vLLM only loads plain model dirs, so a `.gpart` or PEFT adapter is first merged,
on the --device of the evaluation and in the dtype vLLM will run in (`vllm_dtype`), into --merged-dir (kept) or a
temporary dir under $TMPDIR (removed afterwards, even when decoding fails). The disk must hold the merged model:
that is checked before the merge, from the model's config.

vLLM is an optional extra for CUDA machines: `pip install 'gpart[vllm]'`. It pins its own torch, so the safe setup is a
separate virtual environment for it.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from ..errors import GpartError

BACKENDS = ("hf", "vllm")
INSTALL = "pip install 'gpart[vllm]'"


def check(req, family: str) -> None:
    """Refuse what vLLM cannot do for `req` before anything is loaded: unknown backend, task, or no vLLM."""
    if req.backend not in BACKENDS:
        raise GpartError(f"--backend {req.backend!r} is not one of {', '.join(BACKENDS)}")
    if req.backend == "hf":
        if getattr(req, "merged_dir", None) is not None:
            raise GpartError("--merged-dir names where --backend vllm merges an adapter; add --backend vllm or drop it")
        return
    if family != "generation":
        raise GpartError(f"--backend vllm decodes text: it applies to gsm8k, math and mawps, not {req.task}; "
                         f"drop --backend for classification tasks")
    if req.predictions is not None:
        raise GpartError("--predictions scores outputs made elsewhere and runs no model; drop --backend vllm")
    if req.gguf_file:
        raise GpartError("--backend vllm loads transformers model dirs, not GGUF files; drop --gguf-file or "
                         "use --backend hf")
    _vllm()


def _vllm():
    try:
        import vllm
    except ImportError:
        raise GpartError(f"--backend vllm needs vLLM, an optional extra for CUDA machines: {INSTALL}") from None
    return vllm


@contextmanager
def model_dir(req, ref, precision=None, device=None) -> Iterator[Path]:
    """A dir vLLM can load: the merged or base model as given, or the adapter merged on `device` (default cpu) in
    vLLM's dtype (`vllm_dtype(precision)`; default: the run's) into --merged-dir or a temporary dir."""
    from ..adapters.loading import resolve

    if ref is None:
        if not req.model:
            raise GpartError("give --model (a base or merged model) and/or --adapter")
        yield Path(resolve(req.model))
        return
    if ref.kind == "merged":
        yield ref.path
        return
    dtype = vllm_dtype(precision) if precision is not None else None
    merge = _merge_gpart if ref.kind in ("gpart", "authors") else _merge_peft
    if req.merged_dir is not None:
        out = Path(req.merged_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise GpartError(f"--merged-dir {out} already holds files; name a new or empty directory (the merged "
                             f"model is written there and kept)")
        merge(req, ref, out, dtype, device)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="gpart-vllm-") as tmp:
        out = Path(tmp) / "merged"
        merge(req, ref, out, dtype, device)
        yield out


def check_disk_space(source, out: Path, dtype: str, named: bool = False) -> None:
    """Refuse to start a merge whose output cannot fit: the model's parameter count (from its config, nothing
    loaded) times the dtype's size, against the free space where `out` goes."""
    import torch

    from ..adapters.loading import load_skeleton, torch_dtype

    count = sum(p.numel() for p in load_skeleton(source, "causal_lm").parameters())
    need = count * torch.empty((), dtype=torch_dtype(dtype)).element_size()
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need * 1.02 + 2**26 > free:  # + tokenizer files and slack
        hint = "free some space there or name a --merged-dir on a disk with room" if named \
            else "pass --merged-dir DIR on a disk with room (the default is under $TMPDIR)"
        raise GpartError(f"merging for vLLM writes about {need / 2**30:.1f} GiB ({count:,} parameters in {dtype}) to "
                         f"{where}, which has {free / 2**30:.1f} GiB free; {hint}")


def _release_gpu() -> None:
    """Give the merge's GPU memory back before vLLM sizes its KV cache from what is free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merge_gpart(req, ref, out: Path, dtype: str | None, device) -> None:
    """W0 + Pθ in fp32, saved in `dtype` (default: the dtype the adapter was trained on, what `gpart merge` writes)."""
    from ..adapters.devices import check_dtype
    from ..adapters.loading import recorded_source
    from ..adapters.merged_dir import merge_to_dir

    recorded = (ref.artifact.meta.get("base_model") or {}) if ref.artifact is not None else {}  # the authors': none
    base = ref.base(req.model)
    target = check_dtype(dtype or recorded.get("dtype") or "float32")
    check_disk_space(recorded_source(base, ref.recipe, target, req.trust_remote_code), out, target,
                     req.merged_dir is not None)
    merge_to_dir(base, ref, out, target, req.trust_remote_code, device)
    _release_gpu()


def _merge_peft(req, ref, out: Path, dtype: str | None, device) -> None:
    """LoRA / Uni-LoRA folded into the base by PEFT on `device`, saved in `dtype` (default: the run's)."""
    import torch

    from ..adapters.devices import Precision
    from ..adapters.loading import load_tokenizer, torch_dtype
    from ..adapters.merged_dir import merge_load_dtype
    from ..adapters.reference import load_scored, peft_base

    target = dtype or (((ref.recipe or {}).get("model") or {}).get("dtype")) or "float32"
    check_disk_space(peft_base(req, ref, target), out, target, req.merged_dir is not None)
    # Loaded in the target dtype when the checkpoint is stored in it (nothing to round), else in fp32.
    load = merge_load_dtype(peft_base(req, ref, target), target)
    model, source = load_scored(req, ref, "causal_lm", device or torch.device("cpu"), Precision(load))
    model.merge_and_unload().to(torch_dtype(target)).save_pretrained(out, safe_serialization=True)
    load_tokenizer(source).save_pretrained(out)
    del model
    _release_gpu()


def vllm_dtype(precision) -> str:
    """The dtype vLLM runs in: what the run computed in (bf16 autocast -> bfloat16), else the weights' dtype."""
    from ..adapters.devices import dtype_name

    return dtype_name(precision.autocast) if precision.autocast is not None else precision.weights


def generate(path: Path, prompts: list[str], *, max_new_tokens: int, stop: list[str], tensor_parallel_size: int = 1,
             dtype: str = "auto", trust_remote_code: bool = False) -> list[str]:
    """Greedy completions of `prompts` by vLLM from the model dir `path`, post-processed as the HF path does.

    dtype "auto" is vLLM's own choice (a bf16 dir stays bf16, an fp32 one runs fp16); `gpart eval` passes the
    precision the run trained in (`vllm_dtype`).
    """
    from transformers import AutoConfig, GenerationConfig

    from ..adapters.loading import ModelSource, load_tokenizer
    from .generate import cut_at_stop, end_token_ids

    vllm = _vllm()
    tokenizer = load_tokenizer(ModelSource(str(path), trust_remote_code=trust_remote_code))
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # a model dir without generation_config.json
        generation_config = None
    # HF's stop check reads special tokens too ("<|im_end|>"); vLLM matches stop strings on text without them,
    # so stop strings that are single added tokens stop it by id.
    added = tokenizer.get_added_vocab()
    stop_ids = end_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer) | \
        {added[s] for s in stop if s in added}
    encoded = tokenizer(list(prompts))["input_ids"]
    # Room for the longest prompt and its answer: by default vLLM sizes for the model's whole context (128k
    # tokens for Llama 3.1), which may not fit the KV cache.
    limit = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code),
                    "max_position_embeddings", None)
    needed = max((len(ids) for ids in encoded), default=1) + max_new_tokens
    if limit is not None and needed > limit:
        raise GpartError(f"the longest prompt plus --max-new-tokens is {needed} tokens, beyond the model's context of "
                         f"{limit} (max_position_embeddings); vLLM cannot decode past it: lower --max-new-tokens or "
                         f"use --backend hf")
    llm = vllm.LLM(model=str(path), tokenizer=str(path), dtype=dtype, seed=0, trust_remote_code=trust_remote_code,
                   tensor_parallel_size=tensor_parallel_size, max_model_len=needed)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop),
                                 stop_token_ids=sorted(stop_ids), skip_special_tokens=True)
    results = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)  # in input order
    texts = tokenizer.batch_decode([list(r.outputs[0].token_ids) for r in results], skip_special_tokens=True)
    return [cut_at_stop(t, stop) for t in texts]


def run_generation(req, name: str, rows: list[dict], ref, precision, console=None, device=None
                   ) -> tuple[dict, list[dict]]:
    """Decode every prompt of task `name` with vLLM and score it like `tasks.run_generation`.

    `ref` is the scored adapter (None: the plain --model), `precision` the one its run trained in (or --dtype),
    `device` where an adapter is merged.
    """
    from rich.console import Console

    from ..adapters.loading import ModelSource, load_tokenizer
    from .generate import MATH_STOPS
    from .tasks import max_new_tokens_for, prompts_for, score_outputs
    from .templates import eval_rendering

    console = console or Console(stderr=True)
    with model_dir(req, ref, precision, device) as path, console.status(f"{name}: {len(rows)} prompts through vLLM"):
        tokenizer = load_tokenizer(ModelSource(str(path), trust_remote_code=req.trust_remote_code))
        rendering = eval_rendering(ref, tokenizer, console)  # the run's prompts, as the hf backend renders them
        outputs = generate(path, prompts_for(name, rows, rendering, tokenizer),
                           max_new_tokens=max_new_tokens_for(name, req.max_new_tokens),
                           stop=rendering.stops(tokenizer, MATH_STOPS), tensor_parallel_size=req.tensor_parallel_size,
                           dtype=vllm_dtype(precision), trust_remote_code=req.trust_remote_code)
    return score_outputs(name, rows, outputs)
