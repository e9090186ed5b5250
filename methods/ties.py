"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., "TIES-Merging:
Resolving interference when merging models", NeurIPS 2023; authors' code
``ties_merging`` / ``topk_values_mask`` / ``resolve_sign`` / ``disjoint_merge``).

* Trim: each task vector keeps its top-k% entries by magnitude, the threshold being
  taken over the whole flattened task vector (all merged tensors), as the authors do;
  ties at the threshold are kept (``|tau| >= kth value``).
* Elect: the merged sign of an entry is the sign of the sum of the trimmed values.
  An exact zero sum takes the majority sign; the authors take it over the whole
  model, we take it per tensor (it only decides exact ties, bounded memory).
* Disjoint mean: the mean of the trimmed values that agree with the elected sign.
* theta = theta_pre + lambda * merged; defaults k = 20%, lambda = 0.3 (the ViT
  setting of the AdaMerging / EMR-Merging / T-Switch tables).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mergebench.hyperparameters import Float
from mergebench.merging import merge_task_vectors
from mergebench.method import Method, StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import register_method


def trim_thresholds(pool: ModelPool, keep: float) -> list[float]:
    """Per task, the magnitude of the k-th largest entry of its whole task vector."""
    thresholds = []
    for task in tqdm(pool.tasks, desc="ties: trim thresholds", leave=False):
        magnitudes = torch.cat([pool.task_vector(task, key).abs().flatten().float() for key in pool.merged_keys])
        thresholds.append(magnitude_threshold(magnitudes, keep))
    return thresholds


def magnitude_threshold(magnitudes: torch.Tensor, keep: float) -> float:
    """The value v such that ``magnitudes >= v`` keeps the top ``keep`` fraction."""
    n = magnitudes.numel()
    k = min(max(n - int(n * keep), 1), n)
    return float(magnitudes.kthvalue(k).values)


def elect_and_merge(trimmed: torch.Tensor) -> torch.Tensor:
    """Sign election and disjoint mean over the stacked (K, ...) trimmed task vectors."""
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority if majority != 0 else 1.0
    agrees = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agrees
    counts = agrees.sum(0).clamp(min=1)
    return selected.sum(0) / counts


@register_method("ties")
class Ties(Method):
    name = "ties"
    hyperparameters = {
        "keep": Float(0.2, "k: the fraction of largest-magnitude entries kept per task vector", 0.0, 1.0, low_open=True),
        "scaling": Float(0.3, "lambda: the factor on the merged task vector", 0.0),
    }

    def merge(self, pool, exemplars=None):
        keep, scaling = float(self.hparams["keep"]), float(self.hparams["scaling"])
        thresholds = torch.tensor(trim_thresholds(pool, keep))

        def combine(key, taus):
            stacked = torch.stack(taus)
            limit = thresholds.view(-1, *([1] * (stacked.dim() - 1))).to(stacked.dtype)
            trimmed = stacked * (stacked.abs() >= limit)
            return scaling * elect_and_merge(trimmed)

        return StaticMerged(pool.backbone, merge_task_vectors(pool, combine, desc=self.name))
