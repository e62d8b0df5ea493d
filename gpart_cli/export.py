"""`gpart merge` (docs/design.md §5): write a standard transformers model dir with W0 + Pθ folded in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import atomic
from .artifact import load, read_artifact
from .devices import check_dtype, dtype_name
from .errors import GpartError, first_line
from .loading import ModelSource, load_model, load_tokenizer, recorded_source, resolve, torch_dtype
from .model import merge
from .portable_config import make_portable


def _base_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(source.name_or_path), revision=source.revision,
                                          trust_remote_code=source.trust_remote_code,
                                          **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as e:
        raise GpartError(f"could not read the config of {source.name_or_path!r}: {first_line(e)}") \
            from None


def infer_task_type(source: ModelSource) -> str:
    """The auto-class family of a base model, from its config's `architectures`."""
    arch = (getattr(_base_config(source), "architectures", None) or [""])[0]
    for suffix, task_type in (("ForCausalLM", "causal_lm"), ("ForSequenceClassification", "sequence_classification"),
                              ("ForImageClassification", "image_classification")):
        if arch.endswith(suffix):
            return task_type
    return "base"


def load_adapted(base: str, adapter: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False,
                 device: torch.device | None = None):
    """Load `base` for the adapter's task onto `device` and apply the adapter; returns (model, artifact, source).

    Merging and evaluation always load an unquantized copy: the recipe's quantization is not passed on. `adapter`
    may also be an authors' adapter (see `gpart_cli.interop`).
    """
    from .interop import convert

    if convert.is_authors_adapter(adapter):
        return convert.load_adapted(base, adapter, dtype, trust_remote_code, device)
    art = read_artifact(adapter)
    source = recorded_source(base, art.meta.get("recipe"), dtype, trust_remote_code)
    task = art.meta.get("task") or {}
    task_type = task.get("type") or infer_task_type(source)
    model = load_model(source, task_type, task.get("num_labels"), task.get("labels"), device)
    return load(model, art.path), art, source


def _load_dtype(source: ModelSource, target: str) -> str:
    """The dtype to load the base in so that merging rounds once, exactly as an fp32 merge then a cast would.

    GPart sums W0 + ΔW in fp32 and rounds to the layer's dtype. When the checkpoint is stored in `target` (a bf16
    release merged to bf16), loading it in `target` loses nothing and halves the memory; otherwise load fp32.
    """
    config = _base_config(source)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = dtype_name(stored) if isinstance(stored, torch.dtype) else stored
    return target if stored == target else "float32"


def merge_to_dir(base: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                 trust_remote_code: bool = False, device: torch.device | None = None, check: bool = False):
    """Merge (fp32 sums, one rounding), cast to `dtype` (default: the adapter's training dtype), save atomically.

    The saved config.json also carries the fields transformers 4.x and vLLM read (see `portable_config`).
    Returns the output dir; with `check`, (dir, `merge_check.MergeCheck`): merged vs unmerged logits on a few inputs.
    """
    from .interop import convert

    meta = {} if convert.is_authors_adapter(adapter) else read_artifact(adapter).meta  # theirs: no dtype, no recipe
    target = check_dtype(dtype or (meta.get("base_model") or {}).get("dtype") or "float32")
    probe = recorded_source(base, meta.get("recipe"), trust_remote_code=trust_remote_code)
    model, _, source = load_adapted(base, adapter, _load_dtype(probe, target), trust_remote_code, device)
    if check:
        from .merge_check import compare, probe_inputs, probe_logits

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
    try:
        from transformers import AutoImageProcessor

        AutoImageProcessor.from_pretrained(resolve(source.name_or_path)).save_pretrained(out)
    except (OSError, ValueError, TypeError, KeyError):
        pass
