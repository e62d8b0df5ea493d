"""The `.gpart` artifact (docs/design.md §4): one safetensors file holding theta, the head, and JSON metadata.

Size: 4·d bytes for theta + the head + a few KB of metadata. No pickle: safetensors and JSON only.
Everything is validated on read; every mismatch is a `GpartError` that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from .. import atomic
from ..errors import GpartError
from ..partition import ALGORITHMS, FEISTEL
from ..partition.spec import PartitionSpec
from .config import STORED, GPartConfig
from .model import apply, fingerprint, state_of

FORMAT = "gpart/1"
HEAD_PREFIX = "head."
# A .gpart header is a few KB; refuse absurd ones before parsing (a corrupted length field).
_MAX_HEADER = 64 << 20
_META_KEYS = ("format", *STORED, "targets", "n_params", "base_model", "task", "recipe", "versions", "compute", "sha256")


@dataclass
class Artifact:
    """A decoded, validated `.gpart` file."""

    path: Path
    theta: torch.Tensor
    meta: dict
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def config(self) -> GPartConfig:
        """The config that rebuilds this adapter's partition (targets by exact name)."""
        targets = self.meta["targets"]
        return GPartConfig(**{k: self.meta[k] for k in STORED}, target_modules=tuple(t["name"] for t in targets),
                           bias=any(t["bias"] for t in targets),
                           head_modules=tuple((self.meta.get("task") or {}).get("head_modules") or ()))

    @property
    def spec(self) -> PartitionSpec:
        """The partition identity this adapter's θ lives in."""
        return PartitionSpec.from_record(self.meta)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _versions() -> dict:
    import transformers

    from ..versions import __version__
    return {"gpart": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def base_model_info(model: nn.Module, targets: list[dict], revision: str | None = None,
                    name_or_path: str | None = None) -> dict:
    """{name_or_path, revision, fingerprint, dtype} of the base an adapter was trained on.

    `name_or_path` should be what the user wrote (a hub id or pkg: spec), not the resolved local path.
    """
    name = name_or_path or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), None)
    return {"name_or_path": name, "revision": revision, "fingerprint": fingerprint(targets), "dtype": dtype}


def save(model: nn.Module, path: str | os.PathLike, *, task: dict | None = None, recipe: dict | None = None,
         base_model: dict | None = None) -> Path:
    """Write the adapter of `model` to `path` atomically (docs/design.md §4) and return the path.

    Args:
        model: a model prepared with `gpart.apply` or `gpart.load`.
        path: destination file, conventionally `NAME.gpart`.
        task: {type, num_labels, labels}; the head module names are added.
        recipe: the resolved recipe, stored for reproducibility.
        base_model: overrides the {name_or_path, revision, fingerprint} recorded for the base.
    """
    state = state_of(model)
    params = dict(model.named_parameters())
    task = dict(task or {})
    task["head_modules"] = list(state.config.head_modules)
    meta = {
        "format": FORMAT, **{k: getattr(state.config, k) for k in STORED}, "targets": state.targets,
        "n_params": state.n_params, "base_model": base_model or base_model_info(model, state.targets), "task": task,
        "recipe": recipe or {}, "versions": _versions(), "compute": state.compute.summary(),
    }
    return write_artifact(path, meta, state.theta, {name: params[name] for name in state.head_names})


def write_artifact(path: str | os.PathLike, meta: dict, theta: torch.Tensor, head: dict[str, torch.Tensor]) -> Path:
    """Write theta (fp32), the head tensors and the metadata (JSON values) to `path` atomically."""
    tensors = {"theta": theta.detach().float().cpu().contiguous()}
    for name, value in head.items():
        tensors[HEAD_PREFIX + name] = value.detach().cpu().contiguous()
    meta = {**meta, "sha256": {name: _digest(t) for name, t in tensors.items()}}  # checked on read
    data = st_save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})
    atomic.write_bytes(path, data)
    return Path(path)


def _digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (contiguous, little-endian): safetensors itself checks only the header,
    so a flipped bit in theta or the head would otherwise load as a silently different adapter."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _corrupt(path: Path, why: str) -> GpartError:
    return GpartError(f"{path} is not a valid .gpart adapter ({why}); it may be truncated or corrupted: "
                      f"re-copy it or re-run `gpart train`")


def _read_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise GpartError(f"adapter file {path} does not exist; pass the path of a .gpart file "
                         f"(e.g. runs/NAME/adapter.gpart)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise _corrupt(path, "file shorter than a safetensors header")
    header_len = int.from_bytes(head, "little")
    if header_len > min(size - 8, _MAX_HEADER):
        raise _corrupt(path, f"header length {header_len} does not fit in a {size}-byte file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupted input
        raise _corrupt(path, f"safetensors: {e}") from None
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except (json.JSONDecodeError, TypeError) as e:
        raise _corrupt(path, f"metadata is not JSON: {e}") from None
    return meta, tensors


def _check_meta(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise _corrupt(path, f"metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise GpartError(f"{path} has format {meta['format']!r}; this gpart reads {FORMAT!r}. "
                         f"Upgrade gpart to read newer adapters")
    if meta["partition"] not in ALGORITHMS:
        raise GpartError(f"{path} uses partition algorithm {meta['partition']!r}; this gpart knows "
                         f"{', '.join(ALGORITHMS)}. Upgrade gpart or re-train the adapter")
    for key in ("d", "seed", "n_params"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < (0 if key == "seed" else 1):
            raise _corrupt(path, f"metadata field {key!r} = {meta[key]!r} is not a valid integer")
    if not isinstance(meta["isometric"], bool):
        raise _corrupt(path, f"metadata field 'isometric' = {meta['isometric']!r} is not true/false")
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("bias"), bool)
            and isinstance(t.get("shape"), list) and all(isinstance(s, int) and s > 0 for s in t["shape"])
            for t in targets):
        raise _corrupt(path, "metadata field 'targets' is not a list of {name, shape, bias}")
    theta = tensors.get("theta")
    if theta is None or theta.dtype != torch.float32 or tuple(theta.shape) != (meta["d"],):
        got = "missing" if theta is None else f"{theta.dtype} {tuple(theta.shape)}"
        raise _corrupt(path, f"tensor 'theta' should be float32 [{meta['d']}] (metadata d), got {got}")
    if meta["d"] > meta["n_params"] and meta["partition"] == FEISTEL:
        raise _corrupt(path, f"d = {meta['d']} exceeds N = {meta['n_params']}")
    stray = [k for k in tensors if k != "theta" and not k.startswith(HEAD_PREFIX)]
    if stray:
        raise _corrupt(path, f"unexpected tensors {stray}")
    if not isinstance(meta["task"], dict) or not isinstance(meta["base_model"], dict):
        raise _corrupt(path, "metadata fields 'task' and 'base_model' must be objects")
    for key, upper in (("dropout", 1.0), ("init_bound", float("inf"))):
        if isinstance(meta[key], bool) or not isinstance(meta[key], (int, float)) or not 0 <= meta[key] < upper:
            raise _corrupt(path, f"metadata field {key!r} = {meta[key]!r} is not a number in [0, {upper})")
    seed = meta["init_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _corrupt(path, f"metadata field 'init_seed' = {meta['init_seed']!r} is not an integer")
    if meta["compute"] is not None and not isinstance(meta["compute"], dict):
        raise _corrupt(path, "metadata field 'compute' must be an object")
    _check_digests(path, meta["sha256"], tensors)


def _check_digests(path: Path, digests, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor matches the checksum recorded when it was saved."""
    if not isinstance(digests, dict) or set(digests) != set(tensors) or not all(
            isinstance(v, str) for v in digests.values()):
        raise _corrupt(path, "metadata field 'sha256' does not list one checksum per tensor")
    bad = sorted(name for name, t in tensors.items() if _digest(t) != digests[name])
    if bad:
        raise _corrupt(path, f"tensor {', '.join(repr(b) for b in bad)} does not match its sha256 checksum")


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and validate a `.gpart` file without touching any model.

    Raises:
        GpartError: missing, truncated or corrupted file, unknown format or partition, inconsistent metadata.
    """
    path = Path(path)
    meta, tensors = _read_raw(path)
    _check_meta(path, meta, tensors)
    head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    return Artifact(path=path, theta=tensors["theta"], meta=meta, head=head)


def load(base_model: nn.Module, path: str | os.PathLike | Artifact) -> nn.Module:
    """Apply the adapter at `path` (or an `Artifact` already read) to `base_model` (in place) and restore theta
    and the head.

    Raises:
        GpartError: the file is invalid, or the model's target modules/shapes differ from the adapter's.
    """
    art = path if isinstance(path, Artifact) else read_artifact(path)
    try:
        model = apply(base_model, art.config)
    except GpartError as e:
        raise GpartError(f"{art.path} does not fit this model: {e}") from None
    state = state_of(model)
    differences = art.spec.diff(state.spec, "adapter", "model")  # d, seed, ... are the adapter's by apply
    if differences:
        raise GpartError(f"{art.path} was trained on a different base "
                         f"({art.meta['base_model'].get('name_or_path') or 'unknown'}, fingerprint "
                         f"{art.meta['base_model'].get('fingerprint')}): {'; '.join(str(d) for d in differences)}. "
                         f"Load it into that base model")
    with torch.no_grad():
        state.theta.copy_(art.theta.to(state.theta.device))
    restore_head(model, art, "load the base with num_labels={num_labels}")
    return model


@torch.no_grad()
def restore_head(model: nn.Module, art: Artifact, fix: str) -> None:
    """Copy the adapter's head tensors into `model`; one missing or of another shape is an error that ends with
    `fix` (formatted with the head's `num_labels`)."""
    params = dict(model.named_parameters())
    for name, value in art.head.items():
        if name not in params or params[name].shape != value.shape:
            have = tuple(params[name].shape) if name in params else "missing"
            raise GpartError(f"{art.path}: head tensor {name!r} {tuple(value.shape)} does not fit the model "
                             f"({have}); {fix.format(num_labels=value.shape[0])}")
        params[name].copy_(value.to(params[name].device, params[name].dtype))
