"""Use an authors' adapter wherever gpart takes a `.gpart` (merge, eval, inspect, train init_from), and
`gpart convert` in both directions.

An authors' adapter does not record the module spec (names, shapes, N): it is resolved against the base model,
with PEFT's own matching rules, which gpart's `target_modules` share (exact name or ".name" suffix; a string is a
full-match regular expression), in `named_modules()` order. `gpart convert` needs only the base's config: it
builds the model on the meta device (no weights read).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.artifact import FORMAT, Artifact, base_model_info
from ..core.config import GPartConfig
from ..core.model import adapted_numel, find_targets, matches_target, module_spec
from ..errors import GpartError
from . import authors_format as peft_gpart
from .authors_format import AuthorsAdapter
from .loading import ModelSource, load_model, recorded_source, resolve, task_type_of


def gpart_config(adapter: AuthorsAdapter) -> GPartConfig:
    """The gpart settings that rebuild the adapter's partition and head."""
    return GPartConfig(d=adapter.d, seed=adapter.seed, target_modules=adapter.target_modules, bias=adapter.bias,
                       isometric=adapter.isometric, head_modules=adapter.head_modules, partition=adapter.partition,
                       dropout=adapter.dropout, init_bound=adapter.init_bound)


def _spec(adapter: AuthorsAdapter, model: nn.Module) -> tuple[list[dict], int]:
    """(module spec, N) of the adapter's targets in `model`."""
    config = gpart_config(adapter)
    found = find_targets(model, config)
    inside = [name for name, _ in model.named_modules()
              if name and matches_target(name, config.target_modules) and name not in dict(found)
              and not name.endswith(".base_layer")]
    if inside:
        raise GpartError(f"{adapter.directory}: target module {inside[0]!r} lies inside modules_to_save "
                         f"{list(adapter.head_modules)}; gpart trains such modules densely as the head. Re-save the "
                         f"adapter with target_modules that exclude the head")
    spec = module_spec(found, config.bias)
    return spec, sum(adapted_numel(m, t["bias"]) for (_, m), t in zip(found, spec))


def to_artifact(adapter: AuthorsAdapter, model: nn.Module, name_or_path: str | None = None) -> Artifact:
    """The `.gpart` equivalent of an authors' adapter, its module spec resolved on `model` (meta device is fine).

    Raises:
        GpartError: no module matches, or d is out of range for the adapted parameters.
    """
    spec, n = _spec(adapter, model)
    base = base_model_info(model, spec, adapter.raw.get("revision"),
                           name_or_path or adapter.raw.get("base_model_name_or_path") or "")
    base["dtype"] = None  # their file does not record the dtype it trained in
    task = {"type": adapter.task_type or task_type_of(type(model).__name__), "num_labels": adapter.num_labels if adapter.head
            else None, "labels": None, "head_modules": list(adapter.head_modules)}
    meta = {
        "format": FORMAT, "d": adapter.d, "seed": adapter.seed, "partition": adapter.partition,
        "isometric": adapter.isometric, "targets": spec, "n_params": n, "base_model": base, "task": task,
        "recipe": {}, "versions": {"peft": adapter.raw.get("peft_version")}, "dropout": adapter.dropout,
        "init_bound": adapter.init_bound, "init_seed": None, "compute": None,
        "imported_from": {"format": peft_gpart.FORMAT, "adapter_config": adapter.raw,
                          "assignment_backend": peft_gpart.backend_line(adapter.raw)},
    }
    return Artifact(path=adapter.weights_path, theta=adapter.theta, meta=meta, head=dict(adapter.head))


def source_for(adapter: AuthorsAdapter, base: str, dtype: str = "float32", trust_remote_code: bool = False
               ) -> ModelSource:
    return recorded_source(base, {"model": {"revision": adapter.raw.get("revision")}}, dtype, trust_remote_code)


def task_type_for(adapter: AuthorsAdapter, source: ModelSource, config=None, hint: str | None = None) -> str:
    """The model class family to load: `hint` (what an eval task needs), their task_type, else the base's
    architecture; a headed adapter on a headless base (their GLUE and ViT scripts set no task_type and start from
    roberta-base / a ViT backbone) is a classifier: of images when the config has an image size, else of text."""
    from .loading import base_config, infer_task_type

    task_type = hint or adapter.task_type or infer_task_type(source)
    if adapter.head and task_type not in ("sequence_classification", "image_classification", "causal_lm"):
        config = config if config is not None else base_config(source)
        return "image_classification" if hasattr(config, "image_size") else "sequence_classification"
    return task_type


def load_adapted(base: str, adapter: AuthorsAdapter, dtype: str = "float32", trust_remote_code: bool = False,
                 device: torch.device | None = None, task_type: str | None = None):
    """Load `base` and apply an authors' adapter to it: (model, artifact, source), as `reference.load_adapted`."""
    from ..core.artifact import load

    source = source_for(adapter, base, dtype, trust_remote_code)
    task_type = task_type_for(adapter, source, hint=task_type)
    model = load_model(source, task_type, adapter.num_labels if adapter.head else None, None, device)
    art = to_artifact(adapter, model, base)
    return load(model, art), art, source


def meta_model(base: str, adapter: AuthorsAdapter, trust_remote_code: bool = False) -> nn.Module:
    """The base model's modules on the meta device, from its config alone (no weights read)."""
    from transformers import AutoConfig

    from .loading import auto_class

    source = source_for(adapter, base, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(resolve(source.name_or_path), revision=source.revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise GpartError(f"could not read the config of base model {base!r}: {e}. Pass --model with a local model "
                         f"dir") from None
    task_type = task_type_for(adapter, source, config)
    if adapter.head and task_type in ("sequence_classification", "image_classification"):
        config.num_labels = adapter.num_labels
    with torch.device("meta"):
        return auto_class(task_type).from_config(config, trust_remote_code=trust_remote_code)


def to_peft_gpart(art: Artifact, out: str | os.PathLike) -> Path:
    """`gpart convert x.gpart --to peft-gpart -o DIR`: write a `.gpart` in the authors' format."""
    return peft_gpart.write(out, art.meta, art.theta, art.head)
