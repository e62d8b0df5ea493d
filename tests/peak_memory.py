"""Deterministic peak-memory measurement for tests: the largest total size of tensor storages alive at once.

A TorchDispatchMode sees every tensor an aten op returns; each storage is counted from the op that creates it until
the last tensor viewing it is freed. The figure depends only on the sequence of ops and tensor sizes, not on the
allocator, the machine or other processes (unlike RSS), so a test can compare it with a bound computed from shapes.
Tensors that existed before the block (parameters, inputs) are not counted unless an in-place op inside the block
returns them (then they are, so the figure is an upper bound).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    """`with PeakTensorBytes() as m: ...` then `m.peak`: the most bytes of new tensor storage alive at one time."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[int, int], list[int]] = {}  # (data_ptr, nbytes) -> [bytes, tensors viewing it]
        self.current = self.peak = 0

    def _release(self, key: tuple[int, int]) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(tensor, self._release, key)
        return out
