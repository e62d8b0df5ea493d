"""Build what a run needs from its recipe: the model for the task family, the tokenizer, and the data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.loading import (
    ModelSource,
    build_from_config,
    config_from_dict,
    load_model,
    load_skeleton,
    load_tokenizer,
    resolve,
    skeleton_from_config,
)
from ..adapters.pooling import apply_pooling
from ..data.glue import build_glue_splits, glue_task
from ..data.splits import Splits
from ..errors import GpartError
from ..recipe.schema import Recipe

TASK_TYPE = {"glue": "sequence_classification", "vision": "image_classification", "sft": "causal_lm",
             "text_classification": "sequence_classification"}


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object | None
    splits: Splits
    task_type: str
    task: dict  # {type, num_labels, labels, name}: stored in the artifact


def model_source(recipe: Recipe) -> ModelSource:
    m = recipe.model
    if m.trust_remote_code:
        from rich.console import Console

        Console(stderr=True).print("[yellow]warning:[/] model.trust_remote_code is true: this runs Python code "
                                   f"shipped with {m.name_or_path}; only do this for repositories you trust")
    return ModelSource(name_or_path=m.name_or_path or "", revision=m.revision, dtype=m.dtype,
                       trust_remote_code=m.trust_remote_code, gguf_file=m.gguf_file, quantization=m.quantization)


def _model(recipe: Recipe, task_type: str, num_labels=None, labels=None, device=None, weights=True):
    torch.manual_seed(recipe.train.seed)  # a fresh head (or a config-built model) is seeded too
    if not weights:  # parameters on the meta device (FSDP ranks that receive theirs from rank 0)
        if recipe.model.config is None:
            return load_skeleton(model_source(recipe), task_type, num_labels, labels)
        config = build_from_config(recipe.model.config, task_type, num_labels, labels, config_only=True)
        return skeleton_from_config(config, task_type)
    if recipe.model.config is not None:
        return build_from_config(recipe.model.config, task_type, num_labels, labels)
    return load_model(model_source(recipe), task_type, num_labels, labels, device)


def _vision_config(recipe: Recipe):
    from transformers import AutoConfig

    if recipe.model.config is not None:
        return config_from_dict(recipe.model.config), None
    source = model_source(recipe)
    path = resolve(source.name_or_path)
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path, revision=source.revision)
    except (OSError, ValueError):
        processor = None
    return AutoConfig.from_pretrained(path, revision=source.revision), processor


def build(recipe: Recipe, device: torch.device | None = None, weights: bool = True) -> Setup:
    """Model (loaded onto `device`; without `weights`, its parameters on the meta device), tokenizer and splits for
    the recipe's task family."""
    family, data, seed = recipe.data.family, recipe.data, recipe.train.seed
    task_type = TASK_TYPE[family]
    if recipe.model.pooling != "cls" and task_type != "sequence_classification":
        raise GpartError(f"model.pooling: {recipe.model.pooling} applies to text classification (data.family glue "
                         f"or text_classification); remove it for data.family {family}")
    extra: dict = {}
    if family == "glue":
        task = glue_task(data.task)
        tokenizer = load_tokenizer(model_source(recipe))
        splits = build_glue_splits(data, tokenizer, seed)
        model = apply_pooling(_model(recipe, task_type, task.num_labels, list(task.labels) or None, device, weights),
                              recipe.model.pooling)
    elif family == "text_classification":
        from ..data.text_classification import build_text_classification_splits

        tokenizer = load_tokenizer(model_source(recipe))
        splits = build_text_classification_splits(data, tokenizer, seed)
        model = apply_pooling(_model(recipe, task_type, splits.num_labels, splits.labels, device, weights),
                              recipe.model.pooling)
    elif family == "vision":
        from ..data.vision import build_vision_splits

        tokenizer = None
        config, processor = _vision_config(recipe)
        splits = build_vision_splits(data, config, seed, processor)
        model = _model(recipe, task_type, splits.num_labels, splits.labels, device, weights)
    elif family == "sft":
        from ..data.chat import resolve_rendering
        from ..data.sft_splits import build_sft_splits

        if recipe.model.config is not None and recipe.model.name_or_path is None:
            raise GpartError("data.family sft needs model.name_or_path for the tokenizer")
        tokenizer = load_tokenizer(model_source(recipe))
        splits = build_sft_splits(data, tokenizer, seed)
        extra["template"] = resolve_rendering(data, tokenizer).fingerprint(tokenizer)  # gpart eval checks it
        model = _model(recipe, task_type, device=device, weights=weights)
    else:
        raise GpartError(f"unknown data.family {family!r}")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification pools at the last non-pad
    task = {"type": task_type, "name": f"{family}/{data.task}", "num_labels": splits.num_labels,
            "labels": splits.labels, **extra}
    return Setup(model=model, tokenizer=tokenizer, splits=splits, task_type=task_type, task=task)
