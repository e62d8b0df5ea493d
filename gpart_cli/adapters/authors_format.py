"""The authors' adapter format (SamsungLabs/GPart, a PEFT fork): read it, map it to gpart, write it back.

An adapter saved by their code is a directory with two files:
- `adapter_config.json`: their `GPartConfig` (`peft_type: "GPART"`, d, proj_seed, target_modules, bias,
  assignment_backend, isometric, gpart_dropout, init_bound, modules_to_save, base_model_name_or_path, ...).
- `adapter_model.safetensors`: `base_model.gpart_theta_d` (theta, [d]) and, for each module in modules_to_save,
  its parameters under `base_model.model.<module>.<param>`.

Their `assignment_backend` is one of gpart's partition algorithms (`stateless` = splitmix64-mod-v1,
`materialized` = torch-randint-v1). Their code has written the field since 2026-07-22 (SamsungLabs/GPart 35b0fa7,
which also made `stateless` the default); before, every group came from the torch.randint stream. PEFT writes every
field of a config, so an adapter without the field was saved by that older code: torch-randint-v1. What gpart does
not implement is refused with the field named, never approximated: a mis-merged adapter would look fine and be
wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .. import atomic
from ..errors import GpartError
from ..partition import RANDINT, SPLITMIX
from ..partition.authors import seed64

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
THETA_KEY = "base_model.gpart_theta_d"
HEAD_PREFIX = "base_model.model."
FORMAT = "peft-gpart"
BACKENDS = {"stateless": SPLITMIX, "materialized": RANDINT,
            # names their config still accepts (with a FutureWarning) for the same two backends
            "implicit_stateless_v1": SPLITMIX, "legacy_streaming": RANDINT}
# Why an adapter without assignment_backend is read as torch-randint-v1 (`gpart inspect` shows it).
ABSENT_BACKEND = ("absent: saved by the authors' code before 2026-07-22 (SamsungLabs/GPart 35b0fa7 added the field, "
                  "and PEFT writes every field), whose groups came from torch.randint; read as " + RANDINT)
TASK_TYPES = {"SEQ_CLS": "sequence_classification", "CAUSAL_LM": "causal_lm", "FEATURE_EXTRACTION": "base"}
# field: (value gpart implements, what to do instead). Anything else in these fields is refused.
_ONLY = {
    "projection_type": ("partition", "the Fastfood projection is dense and not a partition; gpart cannot load it"),
    "grouping_strategy": ("random", "signed-magnitude grouping depends on the pretrained weights; gpart implements "
                                    "the random partitions only"),
    "partition_scope": ("global", "per-transformer-block partitions are not implemented in gpart"),
}
# Fields that must be empty/false: gpart would otherwise adapt different modules or weights than they did.
_EMPTY = ("layers_to_transform", "exclude_modules", "target_parameters", "trainable_token_indices",
          "layer_replication", "use_dora")
# Fields that do not change the adapted weights (PEFT bookkeeping, or what their loader overrides anyway).
_IGNORED = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out", "layers_pattern")
_MAPPED = ("d", "proj_seed", "target_modules", "bias", "assignment_backend", "isometric", "gpart_dropout",
           "init_bound", "modules_to_save")


def is_adapter(path: Path) -> bool:
    """Whether `path` is an authors' adapter: its directory, or one of its two files."""
    config = _config_path(Path(path))
    if config is None:
        return False
    try:
        return json.loads(config.read_text()).get("peft_type") == "GPART"
    except (OSError, ValueError, AttributeError):
        return False


def _config_path(path: Path) -> Path | None:
    if path.is_dir():
        path = path / CONFIG_NAME
    elif path.name == WEIGHTS_NAME:
        path = path.with_name(CONFIG_NAME)
    return path if path.name == CONFIG_NAME and path.is_file() else None


@dataclass
class AuthorsAdapter:
    """A validated authors' adapter: the gpart settings it maps to, theta, and the head tensors."""

    directory: Path
    raw: dict                          # adapter_config.json as written
    d: int
    seed: int                          # proj_seed mod 2**64
    partition: str
    target_modules: tuple | str
    bias: bool
    isometric: bool
    dropout: float
    init_bound: float
    head_modules: tuple
    theta: torch.Tensor
    head: dict[str, torch.Tensor]      # model parameter name -> tensor

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    @property
    def task_type(self) -> str | None:
        return TASK_TYPES.get(self.raw.get("task_type"))

    @property
    def num_labels(self) -> int | None:
        """The label count the head was trained for: rows of its narrowest 2-D weight (the output layer)."""
        outs = [t.shape[0] for t in self.head.values() if t.dim() == 2]
        return min(outs) if outs else None


def _refuse(directory: Path, field: str, value, why: str) -> GpartError:
    return GpartError(f"{directory / CONFIG_NAME}: {field} = {value!r} is not supported: {why}")


def _check_supported(directory: Path, raw: dict) -> None:
    for field, (allowed, why) in _ONLY.items():
        if raw.get(field, allowed) != allowed:
            raise _refuse(directory, field, raw[field], why)
    for field in _EMPTY:
        if raw.get(field) not in (None, False, [], {}):
            raise _refuse(directory, field, raw[field], "gpart adapts whole target modules only; re-save the adapter "
                                                        "without it")
    unknown = [k for k in raw if k not in _MAPPED + _IGNORED + _EMPTY + tuple(_ONLY)]
    if unknown:
        raise _refuse(directory, unknown[0], raw[unknown[0]], "this gpart does not know the field, so it cannot "
                                                              "tell whether it changes the adapted weights")


def _int(directory: Path, raw: dict, field: str, default=None, low: int | None = None) -> int:
    value = raw.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise GpartError(f"{directory / CONFIG_NAME}: {field} = {value!r} must be an integer"
                         + (f" >= {low}" if low is not None else ""))
    return value


def _number(directory: Path, raw: dict, field: str, low: float, high: float) -> float:
    value = raw.get(field) or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not low <= value < high:
        raise GpartError(f"{directory / CONFIG_NAME}: {field} = {value!r} must be a number in [{low}, {high})")
    return float(value)


def _targets(directory: Path, raw: dict) -> tuple | str:
    targets = raw.get("target_modules")
    if targets == "all-linear":
        raise _refuse(directory, "target_modules", targets, "'all-linear' depends on PEFT's output-layer rules; "
                                                           "list the module names instead")
    if isinstance(targets, str) and targets:
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return tuple(sorted(targets))  # PEFT stores a set: the order carries no meaning
    raise GpartError(f"{directory / CONFIG_NAME}: target_modules = {targets!r} must be a list of module names or a "
                     f"regular expression")


def _partition(directory: Path, raw: dict) -> str:
    backend = raw.get("assignment_backend")
    if backend is None:
        return RANDINT  # see ABSENT_BACKEND
    if backend not in BACKENDS:
        raise _refuse(directory, "assignment_backend", backend, "use stateless (splitmix64-mod-v1) or materialized "
                                                               "(torch-randint-v1)")
    return BACKENDS[backend]


def backend_line(raw: dict) -> str:
    """Their assignment_backend and the gpart partition it is read as, or why a missing one is torch-randint-v1."""
    backend = raw.get("assignment_backend")
    return ABSENT_BACKEND if backend is None else f"{backend} ({BACKENDS.get(backend, 'not supported')})"


def _bias(directory: Path, raw: dict) -> bool:
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "gpart_only"):
        raise _refuse(directory, "bias", bias, "use none, all or gpart_only")
    return bias != "none"


def _read_tensors(directory: Path, d: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise GpartError(f"{path} does not exist: an authors' adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupted input
        raise GpartError(f"{path} is not a valid safetensors file ({e}); re-copy it") from None
    theta = tensors.pop(THETA_KEY, None)
    if theta is None or tuple(theta.shape) != (d,) or not theta.is_floating_point():
        got = "missing" if theta is None else f"{theta.dtype} {tuple(theta.shape)}"
        raise GpartError(f"{path}: tensor {THETA_KEY!r} should be a float vector of d = {d} values, got {got}")
    stray = [k for k in tensors if not k.startswith(HEAD_PREFIX)]
    if stray:
        raise GpartError(f"{path}: unexpected tensors {stray[:5]} (an authors' GPart adapter holds "
                         f"{THETA_KEY} and modules_to_save under {HEAD_PREFIX})")
    return theta.float(), {k[len(HEAD_PREFIX):]: v for k, v in tensors.items()}


def read(path: str | Path) -> AuthorsAdapter:
    """Read and validate an authors' adapter (its directory or either of its files).

    Raises:
        GpartError: not an authors' GPart adapter, a field gpart does not implement, or bad tensors.
    """
    config = _config_path(Path(path))
    if config is None:
        raise GpartError(f"{path} is not an authors' GPart adapter: expected a directory with {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME}")
    directory = config.parent
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise GpartError(f"{config} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "GPART":
        raise GpartError(f"{config}: peft_type = {raw.get('peft_type') if isinstance(raw, dict) else raw!r} is not "
                         f"GPART; gpart imports the authors' GPart adapters only")
    _check_supported(directory, raw)
    d = _int(directory, raw, "d", 1024, low=1)
    heads = raw.get("modules_to_save") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise GpartError(f"{config}: modules_to_save = {heads!r} must be a list of module names")
    theta, head = _read_tensors(directory, d)
    return AuthorsAdapter(
        directory=directory, raw=raw, d=d, seed=seed64(_int(directory, raw, "proj_seed", 42)),
        partition=_partition(directory, raw), target_modules=_targets(directory, raw), bias=_bias(directory, raw),
        isometric=bool(raw.get("isometric", True)), dropout=_number(directory, raw, "gpart_dropout", 0.0, 1.0),
        init_bound=_number(directory, raw, "init_bound", 0.0, math.inf), head_modules=tuple(dict.fromkeys(heads)),
        theta=theta,
        head=head)


# ---------------------------------------------------------------------------------------------------
# Export: a .gpart trained with one of their partitions -> their two files.
# ---------------------------------------------------------------------------------------------------

def backend_of(partition: str) -> str:
    """Their assignment_backend for a gpart partition algorithm; feistel-v1 has none."""
    for backend in ("stateless", "materialized"):
        if BACKENDS[backend] == partition:
            return backend
    raise GpartError(f"the adapter uses partition {partition!r}, which the authors' code does not implement, so it "
                     f"cannot be written in their format. Only adapters trained with method.partition: "
                     f"{SPLITMIX} or {RANDINT} can be exported")


def export_config(meta: dict) -> dict:
    """Their adapter_config.json for a `.gpart` adapter's metadata."""
    targets = [t["name"] for t in meta["targets"]]  # exact names: PEFT matches them exactly, in the same order
    task = meta.get("task") or {}
    peft_task = {v: k for k, v in TASK_TYPES.items()}.get(task.get("type"))
    base = meta.get("base_model") or {}
    return {
        "peft_type": "GPART", "task_type": peft_task, "base_model_name_or_path": base.get("name_or_path") or None,
        "revision": base.get("revision"), "inference_mode": True, "d": meta["d"], "proj_seed": meta["seed"],
        "target_modules": targets, "bias": "gpart_only" if any(t["bias"] for t in meta["targets"]) else "none",
        "assignment_backend": backend_of(meta["partition"]), "isometric": meta["isometric"],
        "gpart_dropout": meta.get("dropout", 0.0), "init_bound": meta.get("init_bound", 0.0),
        "modules_to_save": list(task.get("head_modules") or []) or None, "fan_in_fan_out": False,
        "projection_type": "partition", "partition_scope": "global", "grouping_strategy": "random",
        "layers_to_transform": None, "layers_pattern": None,
    }


def write(directory: str | Path, meta: dict, theta: torch.Tensor, head: dict[str, torch.Tensor]) -> Path:
    """Write their two files into `directory` (atomically, as one directory)."""
    config = export_config(meta)
    tensors = {THETA_KEY: theta.detach().float().cpu().contiguous()}
    tensors.update({HEAD_PREFIX + name: t.detach().cpu().contiguous() for name, t in head.items()})
    directory = Path(directory)
    with atomic.directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / WEIGHTS_NAME).write_bytes(st_save(tensors, metadata={"format": "pt"}))
    return directory
