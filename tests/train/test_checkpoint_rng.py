"""The generator states a checkpoint keeps (train/checkpoint.py): rank 0's CPU generator, and each rank's generator on
its own device, restored by rank, whatever number of GPUs the resumed run sees."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from gpart_cli.train.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint


def _state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


@pytest.fixture
def trained(tmp_path):
    """(model, optimizer, scheduler) of one step, and the directory to checkpoint into."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler, tmp_path / "checkpoints" / "last"


def _restore(trained, files, device, rank):
    model, optimizer, scheduler, path = trained
    return restore_checkpoint(files, path, model, optimizer, scheduler, device, rank)


def test_each_rank_gets_back_its_own_generator(trained):
    model, optimizer, scheduler, path = trained
    path.parent.mkdir()
    cpu = torch.get_rng_state()
    save_checkpoint(path, model, optimizer, scheduler, 1, {}, {0: _state(10), 1: _state(11), 2: _state(12)})
    files = read_checkpoint(path)
    assert sorted(k for k in load(files["optimizer.safetensors"]) if k.startswith("rng.")) == \
        ["rng.rank.0.device", "rng.rank.1.device", "rng.rank.2.device", "rng.torch"]
    for rank in (0, 1, 2):  # CPU ranks (gloo): their device is the CPU
        _restore(trained, files, torch.device("cpu"), rank)
        assert torch.equal(torch.get_rng_state(), _state(10 + rank))
    # A rank the run had no state for (it resumes on more processes) keeps rank 0's CPU generator.
    _restore(trained, files, torch.device("cpu"), 3)
    assert torch.equal(torch.get_rng_state(), cpu)


class FakeCuda:
    """torch.cuda's generator calls on a machine with `count` GPUs: set_rng_state past them raises, as torch does."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.count, self.set = count, []
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def set_rng_state(self, state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index is not None and index >= self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        self.set.append((index, state))


def test_a_checkpoint_of_older_gpart_resumes_with_fewer_gpus_visible(trained, monkeypatch):
    """Older gpart saved every visible GPU's generator as rng.cuda.<i> (here 12, saved under 12 GPUs: "rng.cuda.10"
    sorts before "rng.cuda.2") and restored them all, past the one GPU of CUDA_VISIBLE_DEVICES=0."""
    model, optimizer, scheduler, path = trained
    path.parent.mkdir()
    save_checkpoint(path, model, optimizer, scheduler, 1, {}, {0: _state(0)})
    files = read_checkpoint(path)
    tensors = {k: v for k, v in load(files["optimizer.safetensors"]).items() if not k.startswith("rng.rank.")}
    tensors.update({f"rng.cuda.{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(12)})
    files["optimizer.safetensors"] = save(tensors)
    cuda = FakeCuda(monkeypatch, count=1)
    _restore(trained, files, torch.device("cuda", 0), 0)
    assert [(index, int(state[0])) for index, state in cuda.set] == [(0, 0)]  # rank 0's own GPU, nothing past it
    cuda.set.clear()
    _restore(trained, files, torch.device("cuda", 0), 1)  # other ranks: the file has nothing of theirs
    assert cuda.set == []


def test_a_gpu_rank_restores_its_own_device_whatever_its_index(trained, monkeypatch):
    model, optimizer, scheduler, path = trained
    path.parent.mkdir()
    states = {rank: torch.full((16,), 100 + rank, dtype=torch.uint8) for rank in range(8)}
    save_checkpoint(path, model, optimizer, scheduler, 1, {}, states)  # 8 ranks, one GPU each
    cuda = FakeCuda(monkeypatch, count=1)
    _restore(trained, read_checkpoint(path), torch.device("cuda", 0), 5)  # rank 5 of a job that sees one GPU each
    assert [(index, int(state[0])) for index, state in cuda.set] == [(0, 105)]
