"""A split's batches through ``torch.utils.data.DataLoader``, so that decoding images and
tokenising text run in worker processes beside the device and batches arrive in pinned
memory on CUDA.

A suite whose TaskData reads its batches by position (``TaskData.split_size`` and
``TaskData.batch``) is served as a map-style dataset of whole batches: batch i is the same
examples whichever process builds it, and the DataLoader returns them in order, so the
predictions are those of the plain in-order loop (``TaskData.batches``). With no workers and
no pinning the plain loop is used as it is.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset


class SplitBatches(Dataset):
    """Batch ``index`` of a split: examples [index * batch_size, (index + 1) * batch_size),
    the last batch shorter; ``limit`` keeps only the batches that hold the first examples."""

    def __init__(self, data: Any, task: str, split: str, batch_size: int, limit: int | None = None):
        self.data, self.task, self.split, self.batch_size = data, task, split, batch_size
        size = data.split_size(task, split)
        self.size = size if limit is None else min(size, limit)

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __getitem__(self, index: int) -> Any:
        start = index * self.batch_size
        return self.data.batch(self.task, self.split, start, start + self.batch_size)


def default_workers(device: torch.device) -> int:
    """Worker processes when ``--num-workers`` is not given: none on the CPU (the forward passes
    use its cores, and results stay those of the in-order loop), up to 4 beside an accelerator."""
    if device.type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def split_batches(data: Any, task: str, split: str, batch_size: int, *, workers: int = 0, pin_memory: bool = False,
                  limit: int | None = None) -> Iterable[Any]:
    """The split's (inputs, targets) batches in order: the suite's own loop with no workers and
    no pinning (or when its data cannot be read by position), else a DataLoader over
    :class:`SplitBatches` with ``workers`` processes, pinning batches when ``pin_memory``."""
    if (workers == 0 and not pin_memory) or data.split_size(task, split) is None:
        return data.batches(task, split, batch_size)
    dataset = SplitBatches(data, task, split, batch_size, limit)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, persistent_workers=False)
