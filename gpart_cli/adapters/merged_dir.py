"""`gpart merge` (docs/design.md §5): write a standard transformers model dir with W0 + Pθ folded in.

The config.json is one that every reader understands, not only the transformers that wrote it: transformers 5
writes RoPE settings as `rope_parameters` ({"rope_theta", "rope_type", ...}, or one such dict per attention layer
type) and the weights' dtype as `dtype`. transformers 4.x and vLLM builds that bundle it read the
older top-level `rope_theta`, `rope_scaling` and `torch_dtype`; missing, they silently fall back to a RoPE base of
10,000 (Qwen2.5 needs 1,000,000) and the model loads but is quietly wrong. `make_portable` adds those keys, derived
from what the new format holds, next to it; readers of either generation find what they expect.

`--check` measures how far the merged model's logits are from the unmerged adapter's on a few fixed inputs.

Merging sums W0 + Pθ in fp32 and rounds once into the target dtype; the check measures what that rounding (and the
cast of everything else) does to the outputs: the largest |merged − unmerged| logit over the probe inputs, next to
the largest |logit| for scale. Text models read four fixed sentences through their tokenizer (padded positions left
out), image models a seeded batch of random pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic
from ..core.model import merge
from ..errors import GpartError
from .devices import check_dtype, dtype_name
from .loading import (
    ModelSource,
    base_config,
    load_image_processor,
    load_tokenizer,
    recorded_source,
    torch_dtype,
)
from .reference import AdapterRef, load_adapted, open_adapter


def merge_load_dtype(source: ModelSource, target: str) -> str:
    """The dtype to load the base in so that merging rounds once, exactly as an fp32 merge then a cast would.

    GPart sums W0 + ΔW in fp32 and rounds to the layer's dtype. When the checkpoint is stored in `target` (a bf16
    release merged to bf16), loading it in `target` loses nothing and halves the memory; otherwise load fp32.
    """
    config = base_config(source)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = dtype_name(stored) if isinstance(stored, torch.dtype) else stored
    return target if stored == target else "float32"


def merge_to_dir(base: str, adapter: AdapterRef | str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                 trust_remote_code: bool = False, device: torch.device | None = None, check: bool = False):
    """Merge (fp32 sums, one rounding), cast to `dtype` (default: the adapter's training dtype), save atomically.

    `adapter` is an opened GPart adapter (a .gpart or the authors'), or a path opened here. The saved config.json also carries the fields
    transformers 4.x and vLLM read (`make_portable` below). Returns the output dir; with `check`, (dir,
    `MergeCheck`): merged vs unmerged logits on a few inputs.
    """
    ref = adapter if isinstance(adapter, AdapterRef) else open_adapter(adapter)
    if ref.kind not in ("gpart", "authors"):
        raise GpartError(f"merge folds a GPart adapter into its base; {ref.given} is {ref.describe()}")
    meta = ref.artifact.meta if ref.artifact is not None else {}  # the authors': no dtype, no recipe
    target = check_dtype(dtype or (meta.get("base_model") or {}).get("dtype") or "float32")
    probe = recorded_source(base, ref.recipe, trust_remote_code=trust_remote_code)
    model, _, source = load_adapted(base, ref, merge_load_dtype(probe, target), trust_remote_code, device)
    if check:
        batch = probe_inputs(model, _tokenizer_or_none(source))
        before = probe_logits(model, batch)
    model = merge(model).to(torch_dtype(target))
    result = check and compare(before, probe_logits(model, batch))
    out = Path(out)
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        config = tmp / "config.json"
        config.write_text(json.dumps(make_portable(json.loads(config.read_text()), target), indent=2) + "\n")
        _save_preprocessors(source, tmp)
    return (out, result) if check else out


def _tokenizer_or_none(source: ModelSource):
    try:
        return load_tokenizer(source)
    except (GpartError, OSError, ValueError, TypeError):
        return None


def _save_preprocessors(source: ModelSource, out: Path) -> None:
    # A base without a tokenizer (a vision model) or image processor (a text model) is normal.
    tokenizer = _tokenizer_or_none(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    processor = load_image_processor(source)
    if processor is not None:
        processor.save_pretrained(out)


# The portable config.json.

_GLOBAL_LAYER = "full_attention"     # transformers 4.x's top-level RoPE is the global-attention one (Gemma 2/3)
_LOCAL_LAYER = "sliding_attention"   # transformers 4.x Gemma 3 names its base `rope_local_base_freq`
# Nested configs whose transformers 5 loader folds a top-level `rope_scaling` back into the global layers only; the
# generic loader would replace the whole nested dict with it, so other nested configs get no `rope_scaling`.
_NESTED_SCALING_READERS = ("gemma3",)


def _split_rope(rope: dict) -> tuple[dict | None, dict | None, bool]:
    """(global, local, nested) RoPE dicts of `rope_parameters`, flat or nested by attention layer type."""
    if "rope_theta" in rope or "rope_type" in rope:
        return rope, None, False
    nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
    if not nested:
        return None, None, True
    return nested.get(_GLOBAL_LAYER) or next(iter(nested.values())), nested.get(_LOCAL_LAYER), True


def legacy_rope_fields(config: dict) -> dict:
    """The transformers 4.x RoPE keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) for `config`."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    global_rope, local_rope, nested = _split_rope(rope)
    scaling_ok = not nested or str(config.get("model_type", "")).startswith(_NESTED_SCALING_READERS)
    fields: dict = {}
    if global_rope and global_rope.get("rope_theta") is not None:
        fields["rope_theta"] = global_rope["rope_theta"]
        kind = global_rope.get("rope_type", global_rope.get("type", "default"))
        if kind != "default" and scaling_ok:  # 4.x keeps scaling apart from the base; readers use "type" or "rope_type"
            scaling = {k: v for k, v in global_rope.items() if k != "rope_theta"}
            fields["rope_scaling"] = {**scaling, "rope_type": kind, "type": kind}
    if local_rope and local_rope.get("rope_theta") is not None:
        fields["rope_local_base_freq"] = local_rope["rope_theta"]
    return fields


def make_portable(config: dict, dtype: str) -> dict:
    """`config` plus the legacy keys it lacks: RoPE at top level and `torch_dtype`. Keys already present are kept."""
    out = dict(config)
    for key, value in legacy_rope_fields(config).items():
        if out.get(key) is None:
            out[key] = value
    out.setdefault("torch_dtype", out.get("dtype") or dtype)
    return out


# merge --check.

PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 6 times 7? The answer is: 42",
               "A merged model should say what the adapter said.", "Short one."]
_PIXEL_SEED = 0


@dataclass(frozen=True)
class MergeCheck:
    max_abs_diff: float      # largest |merged − unmerged| logit
    max_abs_logit: float     # largest |unmerged| logit, for scale
    inputs: int              # probe inputs compared

    def describe(self) -> str:
        return (f"merge check: largest |merged - unmerged| logit {self.max_abs_diff:.3g} over {self.inputs} inputs "
                f"(largest |logit| {self.max_abs_logit:.3g})")


def probe_inputs(model, tokenizer=None) -> dict:
    """A batch of fixed inputs for `model`: the probe sentences, or seeded random pixels for an image model."""
    config = model.config
    if tokenizer is None and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        g = torch.Generator().manual_seed(_PIXEL_SEED)
        return {"pixel_values": torch.randn(len(PROBE_TEXTS), getattr(config, "num_channels", 3), size, size,
                                            generator=g)}
    if tokenizer is None:
        raise GpartError("merge --check needs the base's tokenizer (text) or an image_size in its config (vision); "
                         "this base has neither: merge without --check")
    return dict(tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))


@torch.no_grad()
def probe_logits(model, batch: dict) -> torch.Tensor:
    """fp32 logits of `batch`, padded positions (attention_mask 0) set to 0 so they never count."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    finally:
        model.train(was_training)
    mask = batch.get("attention_mask")
    if mask is not None and logits.dim() == 3:  # causal LM: (B, T, V)
        logits = logits * mask[..., None].to(logits.dtype)
    return logits


def compare(before: torch.Tensor, after: torch.Tensor) -> MergeCheck:
    return MergeCheck(max_abs_diff=float((after - before).abs().max()), max_abs_logit=float(before.abs().max()),
                      inputs=before.shape[0])
