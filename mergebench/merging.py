"""Tensor-by-tensor merging: the loop every static method shares.

A static method only says how to combine one tensor's task vectors; this loop
walks the pool key by key, so memory stays at the pretrained model, the merged
model, and K copies of a single tensor. ``finetuned_mean`` is the fallback of the
methods that merge some tensors by other rules (Fisher, RegMean).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from mergebench.pool import ModelPool

Combine = Callable[[str, list[torch.Tensor]], torch.Tensor]


def merge_task_vectors(pool: ModelPool, combine: Combine, desc: str = "merging") -> dict[str, torch.Tensor]:
    """theta = theta_pre + combine(key, [tau_1..tau_K]) for every merged tensor;
    other tensors (integer buffers) keep their pretrained values."""
    merged_keys = set(pool.merged_keys)
    state: dict[str, torch.Tensor] = {}
    for key in tqdm(pool.keys(), desc=desc, unit="tensor", leave=False):
        pre = pool.pretrained(key)
        if key in merged_keys:
            delta = combine(key, pool.task_vectors(key))
            state[key] = (pre + delta.to(pre.dtype)).contiguous()
        else:
            state[key] = pre
    return state


def finetuned_mean(pool: ModelPool, key: str) -> torch.Tensor:
    """Plain mean of one tensor over the fine-tuned checkpoints (float32 or wider)."""
    total = None
    for task in pool.tasks:
        value = pool.finetuned(task, key)
        value = value.to(torch.promote_types(value.dtype, torch.float32))
        total = value if total is None else total + value
    return total / len(pool.tasks)
