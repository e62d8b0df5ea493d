"""Resumable checkpoints without pickle: trainable tensors, optimizer state, scheduler, RNG, step.

`checkpoints/last` and `checkpoints/best` are symlinks to `last-<step>` / `best-<step>` directories. A new
checkpoint is written to a fresh directory, then the link is swapped with one atomic rename, so a kill at
any moment leaves a complete checkpoint behind the link: the previous one or the new one. Reading (the raw
files) and restoring are separate steps so that in a multi-process run rank 0 reads and every rank restores.

Layout of a checkpoint dir:
  trainable.safetensors   the parameters that train (theta + head for gpart), by name
  optimizer.safetensors   optimizer tensors (`state.<param index>.<key>`) and RNG byte states: `rng.torch` (rank 0's
                          CPU generator) and `rng.rank.<rank>.device` (each rank's generator on its own device)
  state.json              step, optimizer scalars and param groups, scheduler state, Python/NumPy RNG, extras
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save_file
from torch import nn

from .. import atomic
from ..errors import GpartError


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def device_rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that draws on `device` (the base model's dropout): its CUDA generator, or the
    CPU's. Each rank has its own; `distributed.gather` brings them to rank 0 for the checkpoint."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _rng_state(device_states: dict[int, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    # Rank 0's CPU, Python and NumPy generators (restored on every rank), and each rank's device generator by rank.
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"rng.rank.{rank}.device": state for rank, state in device_states.items()})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device, rank: int) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    own = tensors.get(f"rng.rank.{rank}.device")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if own is None and rank == 0:  # older gpart: rank 0's process saved every visible GPU as rng.cuda.<index>
            own = tensors.get(f"rng.cuda.{index}")
        if own is not None:
            torch.cuda.set_rng_state(own, index)
    elif own is not None:
        torch.set_rng_state(own)
    # A rank the checkpoint has no state for (the run resumes on more ranks) keeps the state its seed gave it.
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, step: int, extra: dict,
                    device_states: dict[int, torch.Tensor]) -> None:
    """Write everything needed to continue bit-identically from `step`, then point `path` at it.

    `device_states`: each rank's `device_rng_state`, by rank (one entry in a single process).
    """
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state(device_states)
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta,
             "extra": extra}
    target = path.with_name(f"{path.name}-{step:08d}")
    with atomic.directory(target) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))
    link = path.with_name(f".{path.name}.link")
    if link.is_symlink():
        link.unlink()
    os.symlink(target.name, link)
    os.replace(link, path)  # the atomic switch
    # Older checkpoints, and temp dirs a killed run left half-written, are no longer needed.
    for old in [*path.parent.glob(f"{path.name}-*"), *path.parent.glob(f".{path.name}-*.tmp")]:
        if old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)


_FILES = ("state.json", "trainable.safetensors", "optimizer.safetensors")


def _unreadable(path: Path, e: Exception) -> GpartError:
    return GpartError(f"checkpoint {path} is unreadable ({e}); delete it to restart from the previous one")


def read_checkpoint(path: Path) -> dict[str, bytes]:
    """The raw files of a checkpoint dir (the trainable tensors and their optimizer moments: MB for GPart), by name."""
    try:
        return {name: (path / name).read_bytes() for name in _FILES}
    except OSError as e:
        raise _unreadable(path, e) from None


def checkpoint_step(path: Path) -> int | None:
    """The step the checkpoint at `path` was saved at; None when there is none (or it cannot be read)."""
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restore_checkpoint(files: dict[str, bytes], path: Path, model: nn.Module, optimizer, scheduler,
                       device: torch.device, rank: int = 0) -> dict:
    """Restore the checkpoint read from `path` by `read_checkpoint` on rank `rank`, whose generator draws on
    `device`; returns its state (step, extra)."""
    try:
        state = json.loads(files["state.json"])
        trainable = load(files["trainable.safetensors"])
        tensors = load(files["optimizer.safetensors"])
    except Exception as e:  # safetensors raises several types for corrupted input
        raise _unreadable(path, e) from None
    load_trainable_state(model, trainable)
    optimizer.load_state_dict(_join_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(tensors, state["rng"], device, rank)
    return state
