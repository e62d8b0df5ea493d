"""`gpart eval --backend vllm`: the generation tasks (GSM8K, MATH, MAWPS) decoded by vLLM instead of HF `generate`.

Everything but the decoding loop is the HF path's: the same prompts tokenized by the same tokenizer call (vLLM
receives token ids, so both backends start from identical inputs), greedy decoding, the same eos ids, stop
strings and `max_new_tokens`, the new tokens decoded by the HF tokenizer and cut at the first stop string, and the
same scoring and predictions JSONL. vLLM only loads plain model dirs, so a `.gpart` or PEFT adapter is first merged
into a temporary dir (under $TMPDIR), removed afterwards even when decoding fails.

vLLM is an optional extra for CUDA machines: `pip install 'gpart[vllm]'`.
"""

from __future__ import annotations

import json
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
def model_dir(req, what) -> Iterator[Path]:
    """A dir vLLM can load: the merged or base model as given, or the adapter merged into a temporary dir."""
    from ..loading import resolve

    if what.kind is None:
        if not req.model:
            raise GpartError("give --model (a base or merged model) and/or --adapter")
        yield Path(resolve(req.model))
        return
    if what.kind == "merged":
        yield what.path
        return
    with tempfile.TemporaryDirectory(prefix="gpart-vllm-") as tmp:
        out = Path(tmp) / "merged"
        if what.kind == "gpart":
            _merge_gpart(req, what.path, out)
        else:
            _merge_peft(req, what, out)
        yield out


def _merge_gpart(req, adapter: Path, out: Path) -> None:
    """W0 + Pθ in fp32, saved in the dtype the adapter was trained on (what `gpart merge` writes)."""
    from ..artifact import read_artifact
    from ..export import merge_to_dir
    from .models import recorded_base

    base = req.model or recorded_base((read_artifact(adapter).meta.get("base_model") or {}).get("name_or_path"),
                                      adapter)
    merge_to_dir(base, adapter, out, None, req.trust_remote_code)


def _merge_peft(req, what, out: Path) -> None:
    """LoRA / Uni-LoRA folded into the base by PEFT (on the CPU, fp32), saved in the dtype the run trained in."""
    import torch

    from ..devices import Precision
    from ..loading import load_tokenizer, torch_dtype
    from .models import load_scored

    model, source = load_scored(req, what, "causal_lm", torch.device("cpu"), Precision("float32"))
    dtype = (((what.recipe or {}).get("model") or {}).get("dtype")) or "float32"
    model.merge_and_unload().to(torch_dtype(dtype)).save_pretrained(out, safe_serialization=True)
    load_tokenizer(source).save_pretrained(out)


def vllm_dtype(precision) -> str:
    """The dtype vLLM runs in: what the run computed in (bf16 autocast -> bfloat16), else the weights' dtype."""
    from ..devices import dtype_name

    return dtype_name(precision.autocast) if precision.autocast is not None else precision.weights


def generate(path: Path, prompts: list[str], *, max_new_tokens: int, stop: list[str], tensor_parallel_size: int = 1,
             dtype: str = "auto", trust_remote_code: bool = False) -> list[str]:
    """Greedy completions of `prompts` by vLLM from the model dir `path`, post-processed as the HF path does.

    dtype "auto" is vLLM's own choice (a bf16 dir stays bf16, an fp32 one runs fp16); `gpart eval` passes the
    precision the run trained in (`vllm_dtype`).
    """
    from transformers import AutoConfig, GenerationConfig

    from ..loading import ModelSource, load_tokenizer
    from .generate import _eos_ids, cut_at_stop

    vllm = _vllm()
    tokenizer = load_tokenizer(ModelSource(str(path), trust_remote_code=trust_remote_code))
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # a model dir without generation_config.json
        generation_config = None
    # HF's stop check reads special tokens too ("<|im_end|>"); vLLM matches stop strings on text without them,
    # so stop strings that are single added tokens stop it by id.
    added = tokenizer.get_added_vocab()
    stop_ids = _eos_ids(SimpleNamespace(generation_config=generation_config), tokenizer) | \
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


def run_generation(req, name: str, rows: list[dict], what, precision, console=None) -> tuple[dict, list[dict]]:
    """Decode every prompt of task `name` with vLLM and score it like `tasks.run_generation`.

    `what` is the scored model or adapter (`models.scored`), `precision` the one its run trained in.
    """
    from rich.console import Console

    from ..loading import ModelSource, load_tokenizer
    from .generate import MATH_STOPS
    from .tasks import max_new_tokens_for, prompts_for, score_outputs
    from .templates import eval_rendering

    console = console or Console(stderr=True)
    with model_dir(req, what) as path, console.status(f"{name}: {len(rows)} prompts through vLLM"):
        tokenizer = load_tokenizer(ModelSource(str(path), trust_remote_code=req.trust_remote_code))
        rendering = eval_rendering(what, tokenizer, console)  # the run's prompts, as the hf backend renders them
        outputs = generate(path, prompts_for(name, rows, rendering, tokenizer),
                           max_new_tokens=max_new_tokens_for(name, req.max_new_tokens),
                           stop=rendering.stops(tokenizer, MATH_STOPS), tensor_parallel_size=req.tensor_parallel_size,
                           dtype=vllm_dtype(precision), trust_remote_code=req.trust_remote_code)
    return score_outputs(name, rows, outputs)
