"""The methods one trainer runs side by side: gpart, unilora, lora (PEFT), full, linear_probe.

Each method decides which parameters train (and at which learning rate) and how the result is saved:
gpart -> `adapter.gpart`; lora/unilora -> a PEFT adapter dir `adapter/`; full/linear_probe -> `model/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import atomic
from .artifact import save as save_gpart
from .config import GPartConfig
from .errors import GpartError, first_line
from .model import apply

HEAD_CANDIDATES = ("classifier", "score")
RUN_INFO = "gpart_run.json"  # beside PEFT adapters and full models: task + recipe, for `gpart eval`


@dataclass
class Prepared:
    """A model ready to train and the AdamW parameter groups (each with a `name`)."""

    model: nn.Module
    groups: list[dict]
    head_modules: list[str]


def default_head_modules(model: nn.Module, task_type: str) -> list[str]:
    """The task head a classification model class carries (trained densely, saved beside theta)."""
    if task_type == "causal_lm":
        return []
    for name in HEAD_CANDIDATES:
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    raise GpartError(f"cannot find the classification head of {type(model).__name__}; set method.head_modules")


def _in_head(name: str, heads: list[str]) -> bool:
    padded = "." + name
    return any(f".{h}." in padded for h in heads)


def _peft_config(method, heads: list[str], task_type: str):
    from peft import LoraConfig, UniLoraConfig

    common = {"target_modules": list(method.target_modules), "modules_to_save": heads or None}
    if method.name == "lora":
        return LoraConfig(r=method.rank, lora_alpha=method.alpha, lora_dropout=0.0, bias="none", **common)
    return UniLoraConfig(r=method.rank, theta_d_length=method.d, proj_seed=method.seed, **common)


def prepare(model: nn.Module, method, train, task_type: str) -> Prepared:
    """Make the method's parameters trainable and group them: adapter (lr_theta) and head (lr_head)."""
    heads = list(method.head_modules) if method.head_modules is not None else default_head_modules(model, task_type)
    if method.init_from is not None and method.name != "gpart":
        raise GpartError(f"method.init_from applies to method gpart, not {method.name}; remove it")
    if method.name == "gpart":
        start = _start_adapter(model, method.init_from) if method.init_from else None  # spec read on the bare base
        model = apply(model, GPartConfig(d=method.d, seed=method.seed, target_modules=tuple(method.target_modules),
                                         bias=method.bias, isometric=method.isometric, head_modules=tuple(heads),
                                         dropout=method.dropout, init_bound=method.init_bound, init_seed=train.seed,
                                         partition=method.partition))
        if start is not None:
            _start_from(model, start)
    elif method.name in ("lora", "unilora"):
        from peft import get_peft_model

        try:
            model = get_peft_model(model, _peft_config(method, heads, task_type))
        except ValueError as e:
            raise GpartError(f"method {method.name}: {first_line(e)}; check method.target_modules") from None
    elif method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.name == "linear_probe":
        if not heads:
            raise GpartError("method linear_probe needs a task head; it does not apply to causal LM SFT")
        for name, p in model.named_parameters():
            p.requires_grad_(_in_head(name, heads))
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not _in_head(n, heads)]
    head = [p for n, p in model.named_parameters() if p.requires_grad and _in_head(n, heads)]
    groups = [{"name": "adapter", "params": adapter, "lr": train.lr_theta, "weight_decay": train.weight_decay},
              {"name": "head", "params": head, "lr": train.lr_head, "weight_decay": train.weight_decay}]
    return Prepared(model=model, groups=[g for g in groups if g["params"]], head_modules=heads)


def _start_adapter(model: nn.Module, path: str):
    """The adapter method.init_from names, as an `Artifact`: a .gpart file or an authors' adapter (resolved on the
    base model about to be trained)."""
    from .artifact import read_artifact
    from .interop import convert, peft_gpart

    if convert.is_authors_adapter(path):
        return convert.to_artifact(peft_gpart.read(path), model)
    return read_artifact(path)


# (artifact metadata key, recipe field): what must agree for theta to mean the same thing in the new run.
_SAME = (("partition", "method.partition"), ("d", "method.d"), ("seed", "method.seed"),
         ("isometric", "method.isometric"))


def _start_from(model: nn.Module, art) -> None:
    """Copy theta and the head of `art` into a freshly applied model whose partition must be the same."""
    import torch

    from .artifact import _spec_diff
    from .model import state_of

    state = state_of(model)
    ours = {"partition": state.config.partition, "d": state.config.d, "seed": state.config.seed,
            "isometric": state.config.isometric}
    for key, field in _SAME:
        if art.meta[key] != ours[key]:
            raise GpartError(f"method.init_from {art.path}: the adapter has {key} = {art.meta[key]!r} but the recipe "
                             f"has {field} = {ours[key]!r}; set --set {field}={art.meta[key]}")
    if art.meta["targets"] != state.targets:
        raise GpartError(f"method.init_from {art.path}: the adapter adapts other modules than method.target_modules / "
                         f"method.bias select ({_spec_diff(art.meta['targets'], state.targets)}); make them agree")
    params = dict(model.named_parameters())
    with torch.no_grad():
        state.theta.copy_(art.theta.to(state.theta.device))
        for name, value in art.head.items():
            if name not in params or params[name].shape != value.shape:
                raise GpartError(f"method.init_from {art.path}: head tensor {name!r} {tuple(value.shape)} does not fit "
                                 f"the model; check method.head_modules and the task's label count")
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_result(model: nn.Module, method: str, out_dir: Path, *, task: dict, recipe: dict, tokenizer=None) -> Path:
    """Write the trained result in the method's native format; returns the path written."""
    if method == "gpart":
        from .artifact import base_model_info
        from .model import state_of

        source = recipe.get("model") or {}
        base = base_model_info(model, state_of(model).targets, source.get("revision"), source.get("name_or_path"))
        return save_gpart(model, out_dir / "adapter.gpart", task=task, recipe=recipe, base_model=base)
    target = out_dir / ("adapter" if method in ("lora", "unilora") else "model")
    with atomic.directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and method not in ("lora", "unilora"):
            tokenizer.save_pretrained(tmp)
        (tmp / RUN_INFO).write_text(json.dumps({"method": method, "task": task, "recipe": recipe}, indent=2))
    return target
