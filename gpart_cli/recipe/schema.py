"""Recipes (docs/design.md §6): YAML -> `yaml.safe_load` -> strict `from_dict` into frozen dataclasses.

Unknown keys are rejected with the nearest valid key; wrong types and ranges name the field. Values can be
overridden with `--set section.key=value` (the value is parsed as YAML, so `1e-3`, `[a, b]` and `null` work).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..core.config import default
from ..errors import GpartError, nearest
from ..partition import ALGORITHMS
from ..partition.feistel import check_d
from .methods import NAMES as METHODS

FAMILIES = ("glue", "vision", "sft", "text_classification")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
TRAIN_TRANSFORMS = ("random_resized_crop", "resize")   # vision: the authors' augmentation, or a plain resize
EVAL_TRANSFORMS = ("center_crop", "resize")            # vision: resize the short side + center crop, or a plain resize
DISTRIBUTED = ("ddp", "fsdp")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")  # experiment trackers (train/tracking.py)
SFT_FORMATS = ("pairs", "alpaca", "messages")                   # sft rows: (query, response), Alpaca, chat turns
CHAT_TEMPLATES = ("auto", "chat", "none", "metamath", "question_answer")  # sft prompt rendering (see data/chat.py)


@dataclass(frozen=True)
class ModelSection:
    name_or_path: Optional[str] = None      # hub id, local dir, or pkg:PACKAGE/dir
    config: Optional[dict] = None           # build from a transformers config instead (random init)
    revision: Optional[str] = None
    dtype: str = "float32"
    quantization: Optional[str] = None      # nf4 | int8 (bitsandbytes)
    trust_remote_code: bool = False
    gguf_file: Optional[str] = None
    pooling: str = "cls"                    # classification input: cls (the model's own) | mean (masked mean)


@dataclass(frozen=True)
class MethodSection:
    # The GPart fields (config.FROM_RECIPE) take GPartConfig's defaults; see GPartConfig for what each means.
    name: str = "gpart"
    d: int = 23_040
    seed: int = default("seed")              # the partition seed (Uni-LoRA: its projection; VeRA: its A and B)
    target_modules: list = field(default_factory=lambda: ["query", "value"])
    bias: bool = default("bias")
    isometric: bool = default("isometric")
    dropout: float = default("dropout")      # gpart: dropout on ΔW in training (the authors: GLUE 0.1, math 0.05)
    init_bound: float = default("init_bound")  # gpart: theta starts uniform in [-b, b] (seeded); 0 = exactly zeros
    rank: int = 8                            # LoRA / Uni-LoRA / VeRA rank
    alpha: float = 16.0                      # LoRA alpha
    head_modules: Optional[list] = None      # default: the task head the model class has
    partition: str = default("partition")    # gpart: feistel-v1 | splitmix64-mod-v1 | torch-randint-v1 (the authors')
    init_from: Optional[str] = None          # gpart: start theta (and the head) from this .gpart or authors' adapter


@dataclass(frozen=True)
class DataSection:
    family: str = "glue"
    task: str = "sst2"                       # GLUE task, vision dataset name, or SFT dataset name
    path: Optional[str] = None               # hub dataset id (e.g. nyu-mll/glue): used when no files are given, and
    config: Optional[str] = None             # in their place when the files are absent (a machine without them)
    revision: Optional[str] = None           # hub dataset revision (a branch, tag, commit or refs/pr/N)
    train_files: Optional[list] = None       # local jsonl/json/csv/parquet/idx/npz files
    eval_files: Optional[list] = None
    train_split: str = "train"
    eval_split: str = "validation"
    dev_fraction: float = 0.1                # carved from train, seeded: checkpoint selection
    max_length: int = 128
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    text_columns: Optional[list] = None      # GLUE: defaults per task; text_classification: default [text]
    label_column: str = "label"
    labels: Optional[list] = None            # text_classification: class names in id order (default: inferred)
    image_column: str = "image"
    image_size: Optional[int] = None         # vision: defaults to the image processor's, then the model's
    train_transform: str = "random_resized_crop"  # vision: RandomResizedCrop + horizontal flip | resize
    eval_transform: str = "center_crop"      # vision (dev and eval): resize the short side + center crop | resize
    classes: Optional[list] = None           # vision: keep only these class ids, renumbered 0..k-1 in this order
    query_column: str = "query"              # SFT
    response_column: str = "response"
    format: str = "pairs"                    # SFT rows: pairs (data.task's converter) | alpaca | messages
    chat_template: str = "auto"              # SFT rendering: auto | chat | none | metamath | question_answer
    messages_column: str = "messages"        # SFT format messages: the column holding the chat turns
    packing: bool = False                    # SFT: train on packed rows (DataCollatorWithFlattening), no padding
    dev_samples: Optional[int] = None        # SFT: held-out examples for the dev loss


@dataclass(frozen=True)
class TrainSection:
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 32
    grad_accum: int = 1
    lr_theta: float = 5e-3                   # the adapter's learning rate (theta, LoRA, or all weights)
    lr_head: float = 5e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    precision: str = "auto"                  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    eval_every: Optional[int] = None         # steps; None: once per epoch
    save_every: Optional[int] = None         # steps; None: at each eval
    log_every: int = 10
    eval_before: bool = True                 # score the untrained model first (before vs after)
    on_nan: str = "stop"                     # stop | skip
    distributed: str = "ddp"                 # under torchrun: ddp (model replicated) | fsdp (base weights sharded)
    deterministic: bool = False              # bit-reproducible GPU runs (deterministic algorithms; slower)
    report_to: Optional[list] = None         # experiment trackers: tensorboard, wandb, mlflow (default none)


@dataclass(frozen=True)
class EvalSection:
    task: Optional[str] = None               # e.g. glue/sst2, vision/fashion_mnist, gsm8k, math, mawps
    files: Optional[list] = None             # local files for the eval task (default: the data section's)
    split: Optional[str] = None
    limit: Optional[int] = None
    batch_size: int = 32
    max_new_tokens: Optional[int] = None     # default per task: gsm8k 512, math/math500 2048, mawps 256
    dev_batch_size: Optional[int] = None     # rows per forward of the SFT dev loss (default: train.batch_size)


# ---- reinforcement learning with verifiable rewards (rl.objective: grpo, docs/rl.md) ----------------------------
RL_OBJECTIVES = ("none", "grpo")


@dataclass(frozen=True)
class RLSection:
    objective: str = "none"          # none: the data family's supervised loss | grpo: RL on the math task's rewards
    group_size: int = 8              # completions sampled per prompt; each is scored against its group's rewards
    max_completion_length: int = 256  # tokens sampled per completion (longer ones are cut and score as written)
    temperature: float = 1.0         # sampling temperature of the rollouts (their log-probs use it too)
    kl_weight: float = 0.0           # β: weight of the KL to the starting policy; 0 = no reference forward
    reward: Optional[str] = None     # the eval scorer that pays 1.0 (default: the task's first, e.g. metamath)
    format_reward: float = 0.0       # weight of a reward for an answer the task's extraction can read at all
    use_vllm: bool = False           # rollouts through a colocated vLLM engine (GPU); merged weights pushed each step
    vllm_gpu_memory_utilization: float = 0.3  # the vLLM engine's share of GPU memory


# path -> (lowest, whether the lowest itself is allowed, highest or None)
_RL_RANGES = {"rl.group_size": (2, True, None), "rl.max_completion_length": (1, True, None),
              "rl.temperature": (0.0, False, None), "rl.kl_weight": (0.0, True, None),
              "rl.format_reward": (0.0, True, None), "rl.vllm_gpu_memory_utilization": (0.0, False, 1.0)}


def _check_rl(path: str, value: Any) -> None:
    """The rl section's own ranges (the fields GRPO needs of other sections are checked by train/grpo_run.py)."""
    if path == "rl.objective" and value not in RL_OBJECTIVES:
        hint = nearest(str(value), RL_OBJECTIVES)
        raise GpartError(f"recipe field rl.objective = {value!r} is not one of {', '.join(RL_OBJECTIVES)}"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
    if path in _RL_RANGES:
        low, closed, high = _RL_RANGES[path]
        if value < low or (value == low and not closed) or (high is not None and value > high):
            bound = f">= {low}" if closed else f"> {low}"
            raise GpartError(f"recipe field {path} = {value!r} must be {bound}"
                             + (f" and <= {high}" if high is not None else ""))


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    rl: RLSection = field(default_factory=RLSection)
    name: Optional[str] = None
    source: Optional[str] = None             # the file it was read from (informational)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {"method.name": METHODS, "data.family": FAMILIES, "train.schedule": SCHEDULES,
            "train.precision": PRECISIONS, "train.on_nan": ("stop", "skip"), "train.distributed": DISTRIBUTED,
            "model.dtype": ("float32", "bfloat16", "float16"), "model.quantization": ("nf4", "int8", None),
            "model.pooling": ("cls", "mean"), "data.train_transform": TRAIN_TRANSFORMS,
            "data.eval_transform": EVAL_TRANSFORMS, "data.format": SFT_FORMATS,
            "data.chat_template": CHAT_TEMPLATES, "method.partition": ALGORITHMS}
_POSITIVE = {"method.rank", "train.batch_size", "train.grad_accum", "data.max_length",
             "train.log_every", "eval.batch_size", "eval.max_new_tokens", "train.max_steps", "train.eval_every",
             "train.save_every", "data.max_train_samples", "data.max_eval_samples", "eval.limit",
             "data.image_size", "data.dev_samples", "eval.dev_batch_size"}
_NON_NEGATIVE = {"method.seed", "train.seed", "train.weight_decay", "train.lr_theta", "train.lr_head",
                 "train.epochs", "train.max_grad_norm", "method.init_bound"}

_SFT, _VISION, _TEXT = ("sft",), ("vision",), ("glue", "text_classification")
# Fields that only some data families read: (those families, {another family or "*": the field that does the job
# there}). Set to anything but its default under another family, such a field would be accepted and do nothing.
_FAMILY_FIELDS = {
    "eval.task": (_SFT, {"*": "data.task"}),
    "eval.files": (_SFT, {"*": "data.eval_files"}),
    "eval.split": (_SFT, {"*": "data.eval_split"}),
    "eval.limit": (_SFT, {"*": "data.max_eval_samples"}),
    "eval.max_new_tokens": (_SFT, {}),
    "eval.dev_batch_size": (_SFT, {"*": "eval.batch_size"}),
    "data.query_column": (_SFT, {"vision": "data.image_column", "*": "data.text_columns"}),
    "data.response_column": (_SFT, {"*": "data.label_column"}),
    "data.messages_column": (_SFT, {"vision": "data.image_column", "*": "data.text_columns"}),
    "data.format": (_SFT, {}),
    "data.chat_template": (_SFT, {}),
    "data.packing": (_SFT, {}),
    "data.image_column": (_VISION, {"sft": "data.query_column", "*": "data.text_columns"}),
    "data.image_size": (_VISION, {"*": "data.max_length"}),
    "data.train_transform": (_VISION, {}),
    "data.eval_transform": (_VISION, {}),
    "data.classes": (_VISION, {"text_classification": "data.labels"}),
    "data.labels": (("text_classification",), {"vision": "data.classes"}),
    "data.text_columns": (_TEXT, {"vision": "data.image_column", "sft": "data.query_column"}),
    "data.label_column": (_TEXT + _VISION, {"sft": "data.response_column"}),
    "data.eval_files": (_TEXT + _VISION, {"sft": "eval.files"}),
    "data.eval_split": (_TEXT + _VISION, {"sft": "eval.split"}),
    "data.max_eval_samples": (_TEXT + _VISION, {"sft": "eval.limit"}),
    "data.max_length": (_TEXT + _SFT, {"vision": "data.image_size"}),
    "data.dev_samples": (_TEXT + _SFT, {"vision": "data.dev_fraction"}),
}


def _coerce(path: str, value: Any, hint) -> Any:
    """Check `value` against the annotation `hint`; YAML's "5e-3" strings become floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or origin is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return value
    elif hint is dict:
        if isinstance(value, dict):
            return value
    raise GpartError(f"recipe field {path} = {value!r} should be {_type_name(hint)}")


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(hint, str(hint))


def _check_range(path: str, value: Any) -> None:
    if path in _CHOICES and value not in _CHOICES[path]:
        choices = [c for c in _CHOICES[path] if c is not None]
        hint = nearest(str(value), choices)
        raise GpartError(f"recipe field {path} = {value!r} is not one of {', '.join(choices)}"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
    if path == "method.d":
        check_d(value, name=f"recipe field {path}")
    if path in _POSITIVE and value is not None and value < 1:
        raise GpartError(f"recipe field {path} = {value!r} must be >= 1")
    if path in _NON_NEGATIVE and value is not None and value < 0:
        raise GpartError(f"recipe field {path} = {value!r} must be >= 0")
    if path == "train.report_to":
        for item in value or []:
            if item not in REPORT_TO:
                hint = nearest(str(item), REPORT_TO)
                raise GpartError(f"recipe field train.report_to: {item!r} is not one of {', '.join(REPORT_TO)}"
                                 + (f" (did you mean {hint!r}?)" if hint else ""))
    if path in ("data.dev_fraction", "method.dropout") and not 0 <= value < 1:
        raise GpartError(f"recipe field {path} = {value!r} must be in [0, 1)")
    _check_rl(path, value)


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GpartError(f"recipe section {prefix or 'top level'} should be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            hint = nearest(str(key), fields)
            raise GpartError(f"unknown recipe key {path!r}" + (f"; did you mean {prefix}{hint}?" if hint else
                             f"; valid keys here: {', '.join(fields)}"))
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value, f"{path}.")
        else:
            values[key] = _coerce(path, value, hints[key])
            _check_range(path, values[key])
    return cls(**values)


def from_dict(raw: dict) -> Recipe:
    """Validate a parsed recipe; raises `GpartError` naming the first bad field."""
    recipe = _build(Recipe, raw, "")
    if recipe.model.name_or_path is None and recipe.model.config is None:
        raise GpartError("recipe field model.name_or_path is missing: give a hub id, a local dir, "
                         "pkg:PACKAGE/dir, or model.config to build a model from a config")
    _check_family_fields(recipe)
    return recipe


def _check_family_fields(recipe: Recipe) -> None:
    """Refuse a field set for a data family that does not read it, naming the field that does the job there."""
    family = recipe.data.family
    for path, (families, instead) in _FAMILY_FIELDS.items():
        section, name = path.split(".")
        part = getattr(recipe, section)
        value, default = getattr(part, name), _default(type(part), name)
        if family in families or value == default:
            continue
        other = instead.get(family, instead.get("*"))
        raise GpartError(f"recipe field {path} = {value!r} does nothing for data.family {family} (it applies to "
                         f"{', '.join(families)}); " + (f"set {other} instead" if other else "remove it"))


def _default(cls, name: str):
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=value` strings to the raw recipe mapping (values parsed as YAML)."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise GpartError(f"--set {item!r} should look like section.key=value, e.g. --set train.lr_theta=1e-3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GpartError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GpartError(f"recipe file {path} does not exist; pass a path like recipes/quickstart-sst2-minilm.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise GpartError(f"recipe file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}. "
                         f"Fix the syntax (indentation, colons, quotes)") from None
    if not isinstance(raw, dict):
        raise GpartError(f"recipe file {path} should hold a mapping with sections model, method, data, train, eval")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    raw.setdefault("source", str(path))
    raw.setdefault("name", Path(path).stem)
    try:
        return from_dict(raw)
    except GpartError as e:
        raise GpartError(f"{path}: {e}") from None
