"""The methods one trainer runs side by side, and the one registry that says what each of them is.

`METHODS` maps a recipe's `method.name` to a `Method`: how it is prepared (which parameters train), how its result
is saved and merged, whether d sets its size, and whether FSDP can train it. Everything else asks the registry:
the recipe's choices, `gpart sweep-d` (which methods get one run per d), FSDP's check, and the save. Adding a PEFT
baseline is one `Method` entry here (see `vera`).

Results: gpart -> `adapter.gpart` (folded into the base by `gpart merge`); PEFT methods -> an adapter dir `adapter/`
(PEFT's merge_and_unload folds it, as `gpart eval --backend vllm` does); full/linear_probe -> `model/`, a whole model
already.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import atomic
from ..adapters.run_info import RUN_INFO, write_run_info  # noqa: F401 (RUN_INFO: where a run's record lies, re-exported)
from ..errors import GpartError, first_line

if TYPE_CHECKING:  # torch is imported where a method runs: the recipe reads the registry's names without it
    from torch import nn

HEAD_CANDIDATES = ("classifier", "score")
RESULTS = {"gpart": "adapter.gpart", "peft": "adapter", "model": "model"}  # result kind -> its name in the run dir


@dataclass
class Prepared:
    """A model ready to train and the AdamW parameter groups (each with a `name`)."""

    model: nn.Module
    groups: list[dict]
    head_modules: list[str]


@dataclass(frozen=True)
class Method:
    """One training method.

    prepare(model, method_section, heads, task_type) -> the model with exactly the method's parameters trainable
        (the head's included); `prepare` below groups them and sets the learning rates.
    result: "gpart" | "peft" | "model", the kind of result saved (see `RESULTS`) and so how it is merged.
    sized_by_d: its trainable size is set by method.d (`gpart sweep-d` runs it once per d).
    fsdp: FSDP can train it: its trainable tensors are small enough to stay replicated (full and linear_probe
        train or save every weight).
    """

    prepare: Callable
    result: str
    sized_by_d: bool = False
    fsdp: bool = False


def default_head_modules(model: nn.Module, task_type: str) -> list[str]:
    """The task head a classification model class carries (trained densely, saved beside theta)."""
    from torch import nn

    if task_type == "causal_lm":
        return []
    for name in HEAD_CANDIDATES:
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    raise GpartError(f"cannot find the classification head of {type(model).__name__}; set method.head_modules")


def _in_head(name: str, heads: list[str]) -> bool:
    padded = "." + name
    return any(f".{h}." in padded for h in heads)


# ---- how each method is prepared ------------------------------------------------------------------------
def _gpart(model, method, heads: list[str], task_type: str, init_seed: int):
    from ..core.config import GPartConfig
    from ..core.model import apply

    start = _start_adapter(model, method.init_from) if method.init_from else None  # spec read on the bare base
    model = apply(model, GPartConfig.from_fields(method, target_modules=tuple(method.target_modules),
                                                 head_modules=tuple(heads), init_seed=init_seed))
    if start is not None:
        _start_from(model, start)
    return model


def _peft(make_config: Callable) -> Callable:
    """A PEFT method: `make_config(method, common)` gives its PEFT config; `common` holds the target modules and
    the head, which PEFT trains and saves as modules_to_save."""

    def prepare(model, method, heads: list[str], task_type: str, init_seed: int):
        from peft import get_peft_model

        common = {"target_modules": list(method.target_modules), "modules_to_save": heads or None}
        try:
            return get_peft_model(model, make_config(method, common))
        except ValueError as e:
            raise GpartError(f"method {method.name}: {first_line(e)}; check method.target_modules") from None

    return prepare


def _lora_config(method, common: dict):
    from peft import LoraConfig

    return LoraConfig(r=method.rank, lora_alpha=method.alpha, lora_dropout=0.0, bias="none", **common)


def _unilora_config(method, common: dict):
    from peft import UniLoraConfig

    return UniLoraConfig(r=method.rank, theta_d_length=method.d, proj_seed=method.seed, **common)


def _vera_config(method, common: dict):
    # VeRA (Kopiczko et al. 2024): frozen random A (r x in) and B (out x r) shared by every layer, seeded by
    # method.seed and saved with the adapter; each layer trains only the scaling vectors d (r) and b (out).
    from peft import VeraConfig

    return VeraConfig(r=method.rank, projection_prng_key=method.seed, vera_dropout=0.0, save_projection=True,
                      **common)


def _full(model, method, heads: list[str], task_type: str, init_seed: int):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _linear_probe(model, method, heads: list[str], task_type: str, init_seed: int):
    if not heads:
        raise GpartError("method linear_probe needs a task head; it does not apply to causal LM SFT")
    for name, p in model.named_parameters():
        p.requires_grad_(_in_head(name, heads))
    return model


METHODS: dict[str, Method] = {
    "gpart": Method(_gpart, "gpart", sized_by_d=True, fsdp=True),
    "unilora": Method(_peft(_unilora_config), "peft", sized_by_d=True, fsdp=True),
    "lora": Method(_peft(_lora_config), "peft", fsdp=True),
    "full": Method(_full, "model"),
    "linear_probe": Method(_linear_probe, "model"),
    "vera": Method(_peft(_vera_config), "peft", fsdp=True),
}
NAMES = tuple(METHODS)
D_METHODS = tuple(name for name, m in METHODS.items() if m.sized_by_d)
FSDP_METHODS = tuple(name for name, m in METHODS.items() if m.fsdp)


def method(name: str) -> Method:
    if name not in METHODS:
        raise GpartError(f"unknown method {name!r}; use one of {', '.join(NAMES)}")
    return METHODS[name]


def prepare(model: nn.Module, method_section, train, task_type: str) -> Prepared:
    """Make the method's parameters trainable and group them: adapter (lr_theta) and head (lr_head)."""
    heads = list(method_section.head_modules) if method_section.head_modules is not None \
        else default_head_modules(model, task_type)
    if method_section.init_from is not None and method_section.name != "gpart":
        raise GpartError(f"method.init_from applies to method gpart, not {method_section.name}; remove it")
    model = method(method_section.name).prepare(model, method_section, heads, task_type, train.seed)
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not _in_head(n, heads)]
    head = [p for n, p in model.named_parameters() if p.requires_grad and _in_head(n, heads)]
    groups = [{"name": "adapter", "params": adapter, "lr": train.lr_theta, "weight_decay": train.weight_decay},
              {"name": "head", "params": head, "lr": train.lr_head, "weight_decay": train.weight_decay}]
    return Prepared(model=model, groups=[g for g in groups if g["params"]], head_modules=heads)


def _start_adapter(model: nn.Module, path: str):
    """The adapter method.init_from names, as an `Artifact`: a .gpart file, a gpart run dir, or an authors' adapter
    (resolved on the base model about to be trained)."""
    from ..adapters.authors_convert import to_artifact
    from ..adapters.reference import open_adapter

    ref = open_adapter(path, "method.init_from")
    if ref.kind == "authors":
        return to_artifact(ref.authors, model)
    if ref.kind != "gpart":
        raise GpartError(f"method.init_from {path} is {ref.describe()}; it takes a GPart adapter (.gpart, a gpart run "
                         f"dir, or an authors' adapter)")
    return ref.artifact


# PartitionSpec field -> the recipe field that sets it: what must agree for θ to mean the same thing in the new run.
_RECIPE_FIELD = {"algorithm": "method.partition", "d": "method.d", "seed": "method.seed",
                 "isometric": "method.isometric"}


def _start_from(model: nn.Module, art) -> None:
    """Copy theta and the head of `art` into a freshly applied model whose partition must be the same."""
    import torch

    from ..core.artifact import restore_head
    from ..core.model import state_of

    state = state_of(model)
    differences = art.spec.diff(state.spec, "the adapter", "the recipe's model")
    for diff in differences:
        if diff.field in _RECIPE_FIELD:
            field = _RECIPE_FIELD[diff.field]
            raise GpartError(f"method.init_from {art.path}: the adapter was trained with {field} = {diff.ours!r} but "
                             f"the recipe has {field} = {diff.theirs!r}; set --set {field}={diff.ours}")
    if differences:  # the targets (and so N): another base, or other target_modules / bias
        raise GpartError(f"method.init_from {art.path}: the adapter adapts other modules than method.target_modules / "
                         f"method.bias select ({differences[-1].detail or differences[-1]}); make them agree")
    with torch.no_grad():
        state.theta.copy_(art.theta.to(state.theta.device))
    restore_head(model, art, "check method.init_from's task: its head has {num_labels} labels, and "
                             "method.head_modules")


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_result(model: nn.Module, name: str, out_dir: Path, *, task: dict, recipe: dict, tokenizer=None) -> Path:
    """Write the trained result in the method's native format; returns the path written."""
    kind = method(name).result
    target = out_dir / RESULTS[kind]
    if kind == "gpart":
        from ..core.artifact import base_model_info
        from ..core.artifact import save as save_gpart
        from ..core.model import state_of

        source = recipe.get("model") or {}
        base = base_model_info(model, state_of(model).targets, source.get("revision"), source.get("name_or_path"))
        return save_gpart(model, target, task=task, recipe=recipe, base_model=base)
    with atomic.directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and kind == "model":
            tokenizer.save_pretrained(tmp)
        write_run_info(tmp, name, task, recipe)
    return target
