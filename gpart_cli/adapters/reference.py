"""What `gpart eval` scores: a base or merged model, a .gpart adapter, a PEFT adapter or a run dir, loaded onto the
chosen device in the precision its run trained in (`devices.eval_precision`), with the recipe it was trained from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GpartError
from .devices import Precision
from .loading import ModelSource, load_model, recorded_base, recorded_source, resolve
from .run_info import read_run_info


@dataclass(frozen=True)
class Scored:
    """What an --adapter names: its kind ("gpart" | "peft-gpart" | "peft" | "merged" | None), path and the recipe it
    was trained with (None for a plain --model, and for the authors' adapters, which record none)."""

    kind: str | None
    path: Path | None
    recipe: dict | None


def resolve_adapter(path: Path) -> tuple[str, Path]:
    """("gpart" | "peft-gpart" | "peft" | "merged", path) for an adapter file, an authors' GPart adapter (dir or
    either file), a PEFT dir, a merged dir, or a run dir."""
    from .authors_convert import is_authors_adapter

    if is_authors_adapter(path):
        return "peft-gpart", path if path.is_dir() else path.parent
    if path.is_file():
        return "gpart", path
    if (path / "adapter.gpart").is_file():
        return "gpart", path / "adapter.gpart"
    if (path / "adapter_config.json").is_file():
        return "peft", path
    if (path / "adapter" / "adapter_config.json").is_file():
        return "peft", path / "adapter"
    if (path / "config.json").is_file():
        return "merged", path
    if (path / "model" / "config.json").is_file():
        return "merged", path / "model"
    raise GpartError(f"--adapter {path} is neither a .gpart file, a PEFT adapter dir, a model dir, nor a gpart run dir")


def scored(adapter: Path | None) -> Scored:
    """The adapter's kind, path and training recipe (read from the artifact or the run's gpart_run.json)."""
    if adapter is None:
        return Scored(None, None, None)
    kind, path = resolve_adapter(adapter)
    if kind == "gpart":
        from ..core.artifact import read_artifact

        return Scored(kind, path, read_artifact(path).meta.get("recipe"))
    if kind == "peft-gpart":
        return Scored(kind, path, None)
    return Scored(kind, path, read_run_info(path).get("recipe"))


def load_scored(req, what: Scored, task_type: str, device: torch.device, precision: Precision):
    """(model on `device` in `precision.weights`, the ModelSource its tokenizer/processor come from)."""
    from .merged_dir import load_adapted

    if what.kind is None:
        if not req.model:
            raise GpartError("give --model (a base or merged model) and/or --adapter")
        source = ModelSource(req.model, dtype=precision.weights, trust_remote_code=req.trust_remote_code,
                             gguf_file=req.gguf_file)
        return load_model(source, task_type, device=device), source
    if what.kind == "gpart":
        from ..core.artifact import read_artifact

        art = read_artifact(what.path)
        base = req.model or recorded_base((art.meta.get("base_model") or {}).get("name_or_path"), what.path)
        model, _, source = load_adapted(base, what.path, precision.weights, req.trust_remote_code, device)
        return model, source
    if what.kind == "peft-gpart":
        from . import authors_convert as convert
        from . import authors_format as peft_gpart

        base = convert.base_for(peft_gpart.read(what.path), req.model)
        model, _, source = convert.load_adapted(base, what.path, precision.weights, req.trust_remote_code, device,
                                                task_type)
        return model, source
    if what.kind == "merged":
        source = recorded_source(str(what.path), what.recipe, precision.weights, req.trust_remote_code)
        return load_model(source, task_type, device=device), source
    from peft import PeftModel

    source = peft_base(req, what, precision.weights)
    task = read_run_info(what.path).get("task") or {}
    model = load_model(source, task_type, task.get("num_labels"), task.get("labels"), device)
    return PeftModel.from_pretrained(model, str(what.path)), source


def peft_base(req, what: Scored, dtype: str) -> ModelSource:
    """The base a PEFT adapter applies to (--model, else the one its run or adapter_config.json records), in `dtype`."""
    recorded = ((what.recipe or {}).get("model") or {}).get("name_or_path") or \
        json.loads((what.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = req.model or recorded_base(recorded, what.path)
    return recorded_source(base, what.recipe, dtype, req.trust_remote_code)


def image_processor_for(source: ModelSource):
    """The model's image processor (size, mean, std), or None for a model saved without one."""
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(resolve(source.name_or_path), revision=source.revision)
    except (OSError, ValueError, TypeError, KeyError):
        return None
