"""Tensor-by-tensor merging: the loop every static method shares.

A static method only says how to combine one tensor's task vectors; this loop
walks the pool key by key, so memory stays at the pretrained model, the merged
model, and K copies of a single tensor. ``finetuned_mean`` is the fallback of the
methods that merge some tensors by other rules (Fisher, RegMean).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from mergebench.pool import ModelPool

Combine = Callable[[str, list[torch.Tensor]], torch.Tensor]


# merge_elementwise works on slices of this many entries: a multiple of 32 (torch's
# vectorised reductions over the rows of a stack process 32 columns at a time from the
# start of the tensor, so every slice is reduced in the order the whole tensor would be),
# small enough that the K task vectors of a slice stay in the CPU cache.
CHUNK = 1 << 16


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


def task_vector_slices(pool: ModelPool, key: str) -> Callable[[], Iterator[torch.Tensor]]:
    """One tensor's task vectors as consecutive slices: a callable that starts a pass and yields
    the (K, m) stack of each run of ``CHUNK`` flattened entries (the last one shorter), read in
    place from the memory-mapped checkpoints into one reused stack. A yielded stack is
    overwritten by the next one, so a pass uses each before asking for the next."""
    pre = pool.pretrained(key).reshape(-1)
    finetuned = [pool.finetuned(task, key).reshape(-1) for task in pool.tasks]
    dtype = pre.dtype
    for theta in finetuned:  # the dtype pool.task_vectors gives (theta - pre)
        dtype = torch.promote_types(dtype, theta.dtype)
    stack = torch.empty(len(finetuned), min(CHUNK, pre.numel()), dtype=dtype)

    def slices() -> Iterator[torch.Tensor]:
        for start in range(0, pre.numel(), CHUNK):
            base = pre[start:start + CHUNK]
            taus = stack if len(base) == stack.shape[1] else stack.new_empty(len(finetuned), len(base))
            for row, theta in zip(taus, finetuned):
                torch.sub(theta[start:start + CHUNK], base, out=row)
            yield taus

    return slices


def merge_sliced(pool: ModelPool, combine: Callable[[Callable[[], Iterator[torch.Tensor]]], Iterable[torch.Tensor]],
                 desc: str = "merging") -> dict[str, torch.Tensor]:
    """theta = theta_pre + delta for every merged tensor, delta computed slice by slice:
    ``combine(slices)`` gets the tensor's ``task_vector_slices`` (it may make several passes,
    e.g. one for a statistic of the whole tensor, then one that merges) and yields the merged
    values of each (K, m) stack in order, each written into the result before the next stack
    is read. Other tensors (integer buffers) keep their pretrained values."""
    merged_keys = set(pool.merged_keys)
    state: dict[str, torch.Tensor] = {}
    for key in tqdm(pool.keys(), desc=desc, unit="tensor", leave=False):
        pre = pool.pretrained(key)
        if key not in merged_keys:
            state[key] = pre
            continue
        flat = pre.reshape(-1)
        out = torch.empty_like(flat)
        start = 0
        for delta in combine(task_vector_slices(pool, key)):
            base = flat[start:start + len(delta)]
            torch.add(base, delta.to(base.dtype), out=out[start:start + len(delta)])
            start += len(delta)
        if start != flat.numel():
            raise RuntimeError(f"{key}: the sliced merge gave {start} values for {flat.numel()} entries")
        state[key] = out.view(pre.shape)
    return state


def merge_elementwise(pool: ModelPool, combine: Callable[[torch.Tensor], torch.Tensor],
                      desc: str = "merging") -> dict[str, torch.Tensor]:
    """theta = theta_pre + combine(stack) for every merged tensor, where ``combine`` maps the
    (K, m) stack of the task vectors of m entries to their m merged values, each entry on its
    own (a mean, a weighted sum): the same as ``merge_task_vectors`` with
    ``combine(key, taus) = f(torch.stack(taus))``, bit for bit, but applied to consecutive
    slices of the flattened tensors. The checkpoints are read in place (memory-mapped), each
    task vector slice is written straight into one reused stack, so the merge costs one
    read of the checkpoints and the merged model's memory, not K whole-tensor copies."""
    return merge_sliced(pool, lambda slices: map(combine, slices()), desc=desc)


def finetuned_mean(pool: ModelPool, key: str) -> torch.Tensor:
    """Plain mean of one tensor over the fine-tuned checkpoints (float32 or wider)."""
    total = None
    for task in pool.tasks:
        value = pool.finetuned(task, key)
        value = value.to(torch.promote_types(value.dtype, torch.float32))
        total = value if total is None else total + value
    return total / len(pool.tasks)
