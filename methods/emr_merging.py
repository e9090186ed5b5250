"""EMR-Merging: Elect, Mask & Rescale (Huang et al., "EMR-Merging: Tuning-Free
High-Performance Model Merging", NeurIPS 2024; authors' code
github.com/harveyhuang18/EMR_Merging, ``emr_merging`` in
``merge_lm/model_merging_methods/merging_methods.py`` and ``emr_merge`` in
``merge_vit/src/main_emr_merging.py``).

Per merged tensor, with the task vectors tau_1..tau_K:
* Elect a unified task vector: gamma = sign(sum_k tau_k); epsilon = max_k |tau_k|
  over the tasks whose tau_k has the sign gamma (0 where no task does);
  tau_uni = gamma (.) epsilon.
* Masks: M_k = (tau_k (.) tau_uni > 0).
* Rescalers, one scalar per task over ALL merged parameters of the model:
  lambda_k = sum |tau_k| / sum |M_k (.) tau_uni|.
* Inference with the task identity: theta_k = theta_pre + lambda_k M_k (.) tau_uni.

No hyperparameters (the method is tuning-free). The task vectors are read one
tensor at a time (K copies of one tensor in memory): one pass over the pool elects
tau_uni and the masks and accumulates both sums of lambda_k; lambda is applied at
inference, never baked into the stored vectors, so no second read of the pool is
needed.

Storage (what ``artifacts()`` returns, all of it decoded again for inference), in the
checksummed container of ``mergebench.container``:
* ``unified.mbc``: tau_uni in fp32, one dense entry per stored key; its metadata
  names the tasks;
* ``<task>.masks.mbc`` per task: that task's mask per key as a bool entry, which
  the container bit-packs (1 bit per entry), and lambda_k (fp32 value) and the
  task name in its metadata.
Anything corrupt, truncated or inconsistent raises
:class:`~mergebench.errors.CorruptArtifactError` naming the artifact (and the
tensor). Tensors whose tau_uni is all zero (every task vector zero there, or every
entry cancelling) store nothing.

Deviations from the authors' code (the paper's equations are followed):
* lambda_k: the authors' code accumulates per-tensor *means*,
  sum_l mean|tau_k^l| / sum_l mean|M_k^l (.) tau_uni^l|, which weights each
  tensor by 1/numel; here it is the paper's ratio of sums over all merged entries.
* A zero sum: the authors' flag ``(mean > 0) * 2 - 1`` treats sum_k tau_k = 0 as
  negative (tau_uni = -max of the negative entries there); here gamma = sign(0) = 0,
  so tau_uni = 0 and no mask is set. They differ only where the K entries cancel
  exactly while some are non-zero.
* A zero denominator (task k agrees with tau_uni nowhere, e.g. a task identical
  to the pretrained model) gives lambda_k = 1 instead of inf/NaN; M_k is then all
  zero, so task k runs with theta_pre whatever lambda_k is.
* Merged tensors are the backbone's ``merged_keys``; tau_uni is stored as fp32
  whatever the checkpoint dtype.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from mergebench.container import decode_tensors, encode_tensors
from mergebench.dynamic import ComposedMerged, TaskVectorStore
from mergebench.errors import CorruptArtifactError
from mergebench.method import Method, load_encoder
from mergebench.pool import ModelPool
from mergebench.registry import register_method

UNIFIED = "unified.mbc"
UNIFIED_CONTENT = "emr-merging/unified"
MASKS_CONTENT = "emr-merging/masks"


def masks_artifact(task: str) -> str:
    return f"{task}.masks.mbc"


# --------------------------------------------------------------------------- the algorithm


def elect(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_uni, masks) of the stacked (K, ...) task vectors of one tensor.

    gamma = sign(sum_k tau_k), epsilon = max |tau_k| over the tasks agreeing with
    gamma, tau_uni = gamma * epsilon; masks[k] = tau_k * tau_uni > 0, which is
    exactly "tau_k agrees with gamma" (an agreeing entry makes epsilon > 0)."""
    gamma = torch.sign(taus.sum(0))
    agrees = taus * gamma > 0
    epsilon = (taus.abs() * agrees).amax(0) if taus.shape[0] else torch.zeros_like(gamma)
    return gamma * epsilon, agrees


def rescalers(numerators: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """lambda_k = sum|tau_k| / sum|M_k (.) tau_uni| as fp32; 1 where the denominator is 0."""
    safe = torch.where(denominators > 0, denominators, torch.ones_like(denominators))
    return torch.where(denominators > 0, numerators / safe, torch.ones_like(numerators)).float()


def emr_merge(pool: ModelPool) -> dict[str, bytes]:
    """Elect, mask and rescale over the whole pool; returns the serialized artifacts."""
    K = len(pool.tasks)
    numerators = torch.zeros(K, dtype=torch.float64)
    denominators = torch.zeros(K, dtype=torch.float64)
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, np.ndarray]] = [{} for _ in pool.tasks]
    for key in tqdm(pool.merged_keys, desc="emr-merging: elect", unit="tensor", leave=False):
        taus = torch.stack(pool.task_vectors(key)).float()
        numerators += taus.abs().reshape(K, -1).sum(1, dtype=torch.float64)
        tau_uni, agrees = elect(taus)
        if not torch.any(tau_uni):
            continue  # nothing to store: every M_k (.) tau_uni is zero here
        denominators += (tau_uni.abs() * agrees).reshape(K, -1).sum(1, dtype=torch.float64)
        unified[key] = tau_uni.contiguous()
        for k in range(K):
            masks[k][key] = np.packbits(agrees[k].reshape(-1).numpy(), bitorder="little")
        del taus, agrees
    lambdas = rescalers(numerators, denominators)
    return encode_artifacts(pool.tasks, unified, masks, lambdas)


# --------------------------------------------------------------------------- storage


def encode_artifacts(tasks: list[str], unified: Mapping[str, torch.Tensor],
                     masks: list[Mapping[str, np.ndarray]], lambdas: torch.Tensor) -> dict[str, bytes]:
    """``unified.mbc`` (tau_uni, fp32) and one ``<task>.masks.mbc`` per task (its mask per
    key, held here bit-packed as ``np.packbits`` little bit order, and lambda_k)."""
    artifacts = {UNIFIED: encode_tensors({key: t.float().contiguous() for key, t in unified.items()},
                                         {"content": UNIFIED_CONTENT, "tasks": list(tasks)})}
    for k, task in enumerate(tasks):
        bools = {key: torch.from_numpy(np.unpackbits(packed, count=unified[key].numel(), bitorder="little")
                                       .view(np.bool_)).view(unified[key].shape)
                 for key, packed in masks[k].items()}
        metadata = {"content": MASKS_CONTENT, "task": task, "lambda": float(lambdas[k])}
        artifacts[masks_artifact(task)] = encode_tensors(bools, metadata)
    return artifacts


def decode_unified(data: bytes, tasks: list[str], name: str = UNIFIED) -> dict[str, torch.Tensor]:
    contents = decode_tensors(data, source=name)
    contents.expect_content(UNIFIED_CONTENT)
    if contents.metadata.get("tasks") != list(tasks):
        raise contents.error(f"built for tasks {contents.metadata.get('tasks')}, the pool has {list(tasks)}")
    unified = {}
    for key in contents:
        tensor = contents.dense(key, torch.float32)
        if not torch.isfinite(tensor).all():
            raise contents.error("has NaN or infinite values", key)
        unified[key] = tensor
    return unified


def decode_masks(data: bytes, task: str, unified: Mapping[str, torch.Tensor],
                 name: str | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """(lambda_k, {key: packed mask}) of one task, checked against the unified vector's keys
    and shapes; the masks are kept bit-packed (``np.packbits``, little bit order)."""
    contents = decode_tensors(data, source=name or masks_artifact(task))
    contents.expect_content(MASKS_CONTENT)
    if contents.metadata.get("task") != task:
        raise contents.error(f"holds the masks of task {contents.metadata.get('task')!r}, expected {task!r}")
    lam = float(contents.field("lambda", (int, float)))
    if not math.isfinite(lam):
        raise contents.error(f"lambda is {lam}")
    if set(contents) != set(unified):
        missing, extra = sorted(set(unified) - set(contents)), sorted(set(contents) - set(unified))
        raise contents.error(f"mask keys differ from {UNIFIED} (missing: {missing[:5]}, extra: {extra[:5]})")
    packed = {key: np.packbits(contents.dense(key, torch.bool, unified[key].shape).reshape(-1).numpy(),
                               bitorder="little")
              for key in contents}
    return lam, packed


class EMRStore(TaskVectorStore):
    """The decoded tau_uni, bit-packed masks and rescalers; ``combine`` returns
    sum_k w_k lambda_k M_k (.) tau_uni (one-hot weights with the task identity).
    Masks stay packed (1 bit per entry) and are unpacked for the active tasks only."""

    def __init__(self, tasks: list[str], artifacts: Mapping[str, bytes]):
        self.tasks = list(tasks)
        names = [UNIFIED, *(masks_artifact(t) for t in self.tasks)]
        missing = [n for n in names if n not in artifacts]
        if missing:
            raise CorruptArtifactError(f"missing EMR-Merging artifact(s): {', '.join(missing)}")
        self.unified = decode_unified(artifacts[UNIFIED], self.tasks)
        self.masks: list[dict[str, np.ndarray]] = []
        lambdas = []
        for task in self.tasks:
            lam, packed = decode_masks(artifacts[masks_artifact(task)], task, self.unified)
            lambdas.append(lam)
            self.masks.append(packed)
        self.lambdas = torch.tensor(lambdas, dtype=torch.float32)

    def keys(self) -> list[str]:
        return sorted(self.unified)

    def mask(self, k: int, key: str) -> torch.Tensor:
        """M_k of one tensor as a bool tensor of its shape."""
        tau_uni = self.unified[key]
        bits = np.unpackbits(self.masks[k][key], count=tau_uni.numel(), bitorder="little")
        return torch.from_numpy(bits.astype(np.bool_)).view(tau_uni.shape)

    def combine(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        tau_uni = self.unified[key]
        coefficients = weights.float() * self.lambdas
        active = coefficients.nonzero().squeeze(1).tolist()
        if len(active) == 1:  # task identity: lambda_k M_k (.) tau_uni
            k = active[0]
            return torch.where(self.mask(k, key), coefficients[k] * tau_uni, torch.zeros((), dtype=tau_uni.dtype))
        scale = torch.zeros_like(tau_uni)
        for k in active:
            scale += coefficients[k] * self.mask(k, key)
        return scale * tau_uni


@register_method("emr-merging")
class EMRMerging(Method):
    hyperparameters: dict = {}  # tuning-free
    uses_task_identity = True
    dynamic = True

    def merge(self, pool, exemplars=None):
        return self.rebuild(pool, emr_merge(pool))

    def rebuild(self, pool, artifacts):
        encoder = load_encoder(pool.backbone, pool.pretrained_state())
        return ComposedMerged(pool.backbone, encoder, EMRStore(pool.tasks, artifacts), artifacts=artifacts)
