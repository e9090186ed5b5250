"""Masks and sparsification of task vectors: the pruning rules several methods and the
analyses share, each written once.

* P-Spar (T-Switch Eq. 2): :func:`pulse_mask`, per sign.
* Magnitude top-k: :func:`magnitude_mask` (exactly k entries) and :func:`magnitude_threshold`
  (TIES: ties at the threshold kept).
* TIES trim, elect and disjoint merge (Yadav et al., NeurIPS 2023; authors' ``topk_values_mask``,
  ``resolve_sign``, ``disjoint_merge``): :func:`trim_thresholds`, :func:`trim`,
  :func:`elect_and_merge` (disjoint mean or sum; :func:`sign_balance` lets it run on slices),
  and the per-task entries that agree with the elected sign
  (:func:`selected_entries`, the rows of the authors' ``disjoint_merge_split``).
* DARE drop-and-rescale (Yu et al., ICML 2024): :func:`drop_and_rescale`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mergebench.merging import task_vector_slices
from mergebench.pool import ModelPool


def pulse_mask(tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """P-Spar (Eq. 2): drop the alpha fraction of smallest positive and of smallest
    negative entries (by magnitude), separately; zeros are never kept."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    mask = torch.zeros_like(tau, dtype=torch.bool)
    for side in (tau > 0, tau < 0):
        magnitudes = tau[side].abs()
        drop = int(alpha * magnitudes.numel())
        if magnitudes.numel() == 0:
            continue
        if drop == 0:
            mask |= side
        else:
            level = magnitudes.kthvalue(drop).values  # the alpha-quantile of this side
            mask |= side & (tau.abs() > level)
    return mask


def magnitude_mask(tau: Any, sparsity: float) -> np.ndarray:
    """P-Spar / P-Discard mask: keep the round(n (1 - sparsity)) largest |tau| (ties by position)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if isinstance(tau, torch.Tensor):
        tau = tau.detach().to(device="cpu", dtype=torch.float32).numpy()
    a = np.abs(np.asarray(tau, dtype=np.float32))
    flat = a.ravel()
    k = int(round(flat.size * (1.0 - sparsity)))
    mask = np.zeros(flat.size, dtype=np.bool_)
    if k >= flat.size:
        mask[:] = True
    elif k > 0:
        mask[np.argpartition(-flat, k - 1)[:k]] = True
    return mask.reshape(a.shape)


def magnitude_threshold(magnitudes: torch.Tensor, keep: float) -> float:
    """The value v such that ``magnitudes >= v`` keeps the top ``keep`` fraction."""
    n = magnitudes.numel()
    k = min(max(n - int(n * keep), 1), n)
    return float(magnitudes.kthvalue(k).values)


def trim_thresholds(pool: ModelPool, keep: float) -> list[float]:
    """Per task, the magnitude of the k-th largest entry of its whole task vector (TIES
    trims over all merged tensors at once, as the authors do): exactly
    ``magnitude_threshold`` of the concatenated float32 magnitudes, found without
    concatenating or sorting them. Non-negative float32 values order like their bit
    patterns as integers, so a first pass over the tensors (in slices) counts the
    magnitudes per upper 16 bits, which locates the bin holding the k-th value, and a
    second pass counts the lower 16 bits of the entries in that bin, which gives the value:
    two reads of the checkpoints and K * 2^16 counters, never the task vector."""
    sizes = [pool.pretrained(key).numel() for key in pool.merged_keys]
    n = sum(sizes)
    if n == 0:
        raise ValueError("TIES needs at least one merged tensor to take its trim threshold over")
    rank = min(max(n - int(n * keep), 1), n)  # 1-based, from the smallest, as magnitude_threshold
    tasks = list(pool.tasks)
    high = torch.zeros(len(tasks), 1 << 15, dtype=torch.int64)  # sign bit 0: 2^15 upper halves

    def magnitude_bits(key: str):
        for taus in task_vector_slices(pool, key)():
            yield from enumerate(taus.abs().float().view(torch.int32))

    for key in tqdm(pool.merged_keys, desc="ties: trim thresholds", leave=False):
        for k, bits in magnitude_bits(key):
            high[k] += torch.bincount(bits >> 16, minlength=1 << 15)
    below = high.cumsum(1)
    bins = (below < rank).sum(1)  # the upper half of each task's k-th smallest magnitude
    rest = rank - torch.where(bins > 0, below.gather(1, (bins - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
    low = torch.zeros(len(tasks), 1 << 16, dtype=torch.int64)
    for key in pool.merged_keys:
        for k, bits in magnitude_bits(key):
            inside = bits[(bits >> 16) == bins[k]]
            if len(inside):
                low[k] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
    lows = (low.cumsum(1) < rest.unsqueeze(1)).sum(1)
    patterns = ((bins << 16) | lows).to(torch.int32)
    return [float(value) for value in patterns.view(torch.float32)]


def trim(stacked: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The stacked (K, ...) task vectors of one tensor with every entry below its task's
    threshold zeroed (ties kept)."""
    limit = thresholds.view(-1, *([1] * (stacked.dim() - 1))).to(stacked.dtype)
    return stacked * (stacked.abs() >= limit)


MERGE_FUNCS = ("mean", "sum")


def sign_balance(trimmed: torch.Tensor) -> int:
    """How many entries of the stacked (K, ...) trimmed task vectors sum to a positive value,
    minus how many sum to a negative one: the sum of the elected signs, whose own sign is the
    majority sign that decides the entries summing to exactly zero. An integer, so the balance
    of a tensor is the sum of its slices' (the float32 sum of the signs is the same integer
    below 2^24 entries)."""
    return _balance(trimmed.sum(0))


def _balance(total: torch.Tensor) -> int:
    return int((total > 0).sum()) - int((total < 0).sum())


def elect_and_merge(trimmed: torch.Tensor, merge_func: str = "mean", balance: int | None = None) -> torch.Tensor:
    """Sign election and disjoint merge over the stacked (K, ...) trimmed task vectors.

    The elected sign is the sign of the sum of the trimmed values for both forms (the
    authors' ``resolve_sign``, "mass"); ``merge_func`` "mean" averages the values that agree
    with it (the TIES paper's "dis-mean"), "sum" adds them ("dis-sum": ``disjoint_merge``
    with ``merge_func="dis-sum"`` in the TIES authors' ``merge_utils.py``, the AdaMerging
    authors' ``ties_merging_utils.py`` and FusionBench's ``ties_merging``). An exact zero sum
    takes the majority sign, the sign of ``balance`` (:func:`sign_balance`; of ``trimmed``
    itself when not given, else of the whole tensor ``trimmed`` is a slice of), + on a tie."""
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}, got {merge_func!r}")
    sign = torch.sign(trimmed.sum(0))
    if balance is None:
        balance = _balance(sign)
    sign[sign == 0] = -1.0 if balance < 0 else 1.0
    agrees = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agrees
    if merge_func == "sum":
        return selected.sum(0)
    counts = agrees.sum(0).clamp(min=1)
    return selected.sum(0) / counts


def selected_entries(trimmed: torch.Tensor) -> torch.Tensor:
    """Each task's trimmed entries that agree with the elected sign, 0 elsewhere (K, ...).
    The disjoint mean is non-zero with the elected sign wherever some trimmed value is
    non-zero, so "same sign as the mean" is "agrees with the elected sign"."""
    return trimmed * (trimmed * elect_and_merge(trimmed) > 0)


def drop_and_rescale(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry dropped with probability p, the survivors rescaled by 1 / (1 - p)."""
    if p == 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) >= p
    return tau * keep / (1.0 - p)
