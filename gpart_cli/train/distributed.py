"""Data-parallel training under `torchrun` / `accelerate launch`: DDP, or FSDP2 with `train.distributed: fsdp`.

Each rank runs its pieces of every step (see `sharding`), so the world together computes exactly the
single-process step for any world size; only rank 0 writes the run dir. Under DDP only rank 0 evaluates;
under FSDP every forward is collective, so all ranks evaluate together (see `fsdp`).
"""

from __future__ import annotations

import gc
import json
import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import GpartError

# How long a collective waits for a rank that is busy alone. Generation evals run on every rank (each decodes its
# share of the prompts), but under DDP rank 0 still scores the dev split and writes checkpoints while the others
# wait in the next step's all-reduce: NCCL's default of 10 minutes is too short for a large dev split on a 70B.
DEFAULT_TIMEOUT_S = 3600
TIMEOUT_ENV = "GPART_DIST_TIMEOUT"


def timeout() -> timedelta:
    """The process group's timeout: `GPART_DIST_TIMEOUT` seconds, or an hour."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise GpartError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in whole seconds (e.g. 7200)")
    return timedelta(seconds=seconds)


def world() -> tuple[int, int]:
    """(rank, world size), initialising the process group when launched by torchrun (WORLD_SIZE > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout())
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_(value: torch.Tensor) -> torch.Tensor:
    """`value` replaced in place by its mean over ranks (left as it is without a process group); no host sync."""
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of replicated parameters over ranks in one fp32 all-reduce (what DDP does to them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not dist.is_initialized() or not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_ranks(flag: bool) -> list[bool]:
    """`flag` of every rank, in rank order (every rank calls it); [flag] without a process group."""
    if not dist.is_initialized():
        return [flag]
    device = _comm_device()
    flags = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, torch.tensor([int(flag)], dtype=torch.int32, device=device))
    return [bool(f.item()) for f in flags]


def gather(data: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every rank's uint8 CPU tensor `data`, by rank (every rank calls it; all get all); {0: data} alone."""
    if not dist.is_initialized():
        return {0: data}
    device, world = _comm_device(), dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    sizes = [int(n) for n in torch.cat(sizes).tolist()]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    everyone = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everyone, padded)
    return {rank: t[:n].cpu() for rank, (t, n) in enumerate(zip(everyone, sizes))}


def from_rank0(read: Callable[[], dict[str, bytes]], what: str = "the checkpoint") -> dict[str, bytes]:
    """Files that rank 0 reads, handed to every rank: nodes need not share the run dir's filesystem.

    `read()` runs on rank 0 only; a `GpartError` it raises is raised on every rank (on the others as "rank 0 could
    not read `what`").
    """
    if not dist.is_initialized():
        return read()
    device = _comm_device()
    sizes = torch.full((2,), -1, dtype=torch.int64, device=device)  # (header bytes, payload bytes); -1: failed
    files, error = {}, None
    if dist.get_rank() == 0:
        try:
            files = read()
        except GpartError as e:
            error = e
        if error is None:
            header = json.dumps({name: len(data) for name, data in files.items()}).encode()
            payload = header + b"".join(files.values())
            sizes[0], sizes[1] = len(header), len(payload)
    dist.broadcast(sizes, 0)
    if int(sizes[0]) < 0:
        raise error or GpartError(f"rank 0 could not read {what}; see its error message above")
    buffer = torch.empty(int(sizes[1]), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and len(payload):
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    if dist.get_rank() == 0:
        return files
    data = buffer.cpu().numpy().tobytes()
    lengths, offset = json.loads(data[:int(sizes[0])]), int(sizes[0])
    out = {}
    for name, n in lengths.items():
        out[name], offset = data[offset:offset + n], offset + n
    return out


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to call for training under DDP: DDP around `model`, or `model` itself without a process group.
    (FSDP shards the model in place: `fsdp.shard`.)"""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown(ok: bool = False) -> None:
    """Leave the process group (the caller has dropped its model and optimizer).

    After a run that went right every rank first meets the others at a barrier, monitored under gloo (a rank that
    is gone is named instead of waited for), and frees what FSDP still holds: destroying the group while another
    rank's gloo threads still use it, or while tensors that hold its work are alive, aborts the process at exit
    ("terminate called without an active exception"). After an error no barrier: the other ranks may never come.
    """
    if not dist.is_initialized():
        return
    if ok:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout())
        else:
            dist.barrier()
    gc.collect()
    dist.destroy_process_group()
