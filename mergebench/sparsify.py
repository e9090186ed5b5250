"""Masks and sparsification of task vectors: the pruning rules several methods and the
analyses share, each written once.

* P-Spar (T-Switch Eq. 2): :func:`pulse_mask`, per sign.
* Magnitude top-k: :func:`magnitude_mask` (exactly k entries) and :func:`magnitude_threshold`
  (TIES: ties at the threshold kept).
* TIES trim, elect and disjoint merge (Yadav et al., NeurIPS 2023; authors' ``topk_values_mask``,
  ``resolve_sign``, ``disjoint_merge``): :func:`trim_thresholds`, :func:`trim`,
  :func:`elect_and_merge` (disjoint mean or sum), and the per-task entries that agree with the elected sign
  (:func:`selected_entries`, the rows of the authors' ``disjoint_merge_split``).
* DARE drop-and-rescale (Yu et al., ICML 2024): :func:`drop_and_rescale`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

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
    trims over all merged tensors at once, as the authors do)."""
    thresholds = []
    for task in tqdm(pool.tasks, desc="ties: trim thresholds", leave=False):
        magnitudes = torch.cat([pool.task_vector(task, key).abs().flatten().float() for key in pool.merged_keys])
        thresholds.append(magnitude_threshold(magnitudes, keep))
    return thresholds


def trim(stacked: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The stacked (K, ...) task vectors of one tensor with every entry below its task's
    threshold zeroed (ties kept)."""
    limit = thresholds.view(-1, *([1] * (stacked.dim() - 1))).to(stacked.dtype)
    return stacked * (stacked.abs() >= limit)


MERGE_FUNCS = ("mean", "sum")


def elect_and_merge(trimmed: torch.Tensor, merge_func: str = "mean") -> torch.Tensor:
    """Sign election and disjoint merge over the stacked (K, ...) trimmed task vectors.

    The elected sign is the sign of the sum of the trimmed values for both forms (the
    authors' ``resolve_sign``, "mass"); ``merge_func`` "mean" averages the values that agree
    with it (the TIES paper's "dis-mean"), "sum" adds them ("dis-sum": ``disjoint_merge``
    with ``merge_func="dis-sum"`` in the TIES authors' ``merge_utils.py``, the AdaMerging
    authors' ``ties_merging_utils.py`` and FusionBench's ``ties_merging``)."""
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}, got {merge_func!r}")
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority if majority != 0 else 1.0
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
