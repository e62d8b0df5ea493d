"""`gpart merge` (DESIGN §5): write a standard transformers model dir with W0 + Pθ folded in."""

from __future__ import annotations

import os
from pathlib import Path

from . import atomic
from .artifact import load, read_artifact
from .errors import GpartError, first_line
from .loading import ModelSource, load_model, load_tokenizer, recorded_source, resolve, torch_dtype
from .model import merge


def infer_task_type(source: ModelSource) -> str:
    """The auto-class family of a base model, from its config's `architectures`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve(source.name_or_path), revision=source.revision,
                                            trust_remote_code=source.trust_remote_code,
                                            **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as e:
        raise GpartError(f"could not read the config of {source.name_or_path!r}: {first_line(e)}") \
            from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    for suffix, task_type in (("ForCausalLM", "causal_lm"), ("ForSequenceClassification", "sequence_classification"),
                              ("ForImageClassification", "image_classification")):
        if arch.endswith(suffix):
            return task_type
    return "base"


def load_adapted(base: str, adapter: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False):
    """Load `base` for the adapter's task and apply the adapter; returns (model, artifact, source).

    Merging and evaluation always load an unquantized copy: the recipe's quantization is not passed on.
    """
    art = read_artifact(adapter)
    source = recorded_source(base, art.meta.get("recipe"), dtype, trust_remote_code)
    task = art.meta.get("task") or {}
    task_type = task.get("type") or infer_task_type(source)
    model = load_model(source, task_type, task.get("num_labels"), task.get("labels"))
    return load(model, art.path), art, source


def merge_to_dir(base: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                 trust_remote_code: bool = False) -> Path:
    """Merge in fp32, cast to `dtype` (default: the dtype the adapter was trained on), save atomically."""
    model, art, source = load_adapted(base, adapter, "float32", trust_remote_code)
    target = dtype or (art.meta.get("base_model") or {}).get("dtype") or "float32"
    model = merge(model).to(torch_dtype(target))
    out = Path(out)
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _save_preprocessors(source, tmp)
    return out


def _save_preprocessors(source: ModelSource, out: Path) -> None:
    # A base without a tokenizer (a vision model) or image processor (a text model) is normal.
    try:
        load_tokenizer(source).save_pretrained(out)
    except (GpartError, OSError, ValueError, TypeError):
        pass
    try:
        from transformers import AutoImageProcessor

        AutoImageProcessor.from_pretrained(resolve(source.name_or_path)).save_pretrained(out)
    except (OSError, ValueError, TypeError, KeyError):
        pass
