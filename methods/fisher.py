"""Fisher Merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022).

Sources checked for the defaults and details below:
* the authors' code, github.com/mmatena/model_merging: ``model_merging/fisher.py``
  (``_compute_exact_fisher_for_batch``, ``compute_fisher_for_model``),
  ``model_merging/merging.py`` (``_merge_with_coeffs``: ``fisher_floor=1e-6``,
  ``normalize_fishers=True``, ``favor_target_model``), ``scripts/compute_fisher.py``
  (``n_examples=4096``) and ``scripts/merge_and_evaluate.py``;
* FusionBench, github.com/tanganke/fusion_bench:
  ``config/method/fisher_merging/clip_fisher_merging.yaml`` (``num_fisher_examples: 256``,
  ``minimal_fisher_weight: 1e-6``, ``normalize_fisher_weight: true``) and
  ``fusion_bench/method/fisher_merging/fisher_merging.py``.

What is computed
* Fisher of task k's model (diagonal, per example, exact expectation over the labels,
  as the authors' ``fisher_single_example``; no label is sampled):
  F_k = 1/N sum_n sum_y p_k(y|x_n) (d log p_k(y|x_n) / d theta)^2,
  through the fine-tuned encoder k and task k's fixed head (the head is not
  differentiated), on the task's N unlabelled exemplars. Each example is run alone and
  its C per-class gradients are taken from one forward pass. (FusionBench instead
  squares the gradient of a whole batch's sum_y sqrt(p) log p, which mixes examples
  and classes before squaring; we do not.) torch.func.vmap is not used: Hugging Face's
  attention-mask construction branches on the data (``padding_mask.all()``), which vmap
  rejects, so examples are looped.
* Merge, per entry: theta = sum_k c_k max(F_k, floor) theta_k / sum_k c_k max(F_k, floor)
  with uniform merging coefficients (FusionBench's default; the authors grid-search the
  coefficients of a pair on validation data, which a benchmark without labels cannot),
  ``fisher_floor`` = 1e-6 applied to every model (the authors' ``favor_target_model``
  floors only the target model, and a multi-task merge has none), and
  c_k = 1 / ||F_k||_2 over all differentiated entries when ``normalize`` is true (the
  authors' and FusionBench's default), else c_k = 1.
* Entries whose Fisher is at or below the floor in every model carry no information
  from any model and take the plain mean of the fine-tuned values (the authors' formula
  would give the c_k-weighted mean there; the two agree when ``normalize`` is false).
* Tensors that are identical in every fine-tuned checkpoint (e.g. word embeddings frozen
  during fine-tuning) keep that value and are not differentiated, which saves the
  embedding-table gradients; like the authors' Fisher, which covers trainable variables
  only, they do not enter ||F_k||. Non-floating tensors keep their pretrained values.

Defaults: 256 exemplars per task (FusionBench's ``num_fisher_examples``; the authors'
script uses 4096 and the RegMean authors' Fisher baseline 1000 -- 256 fits every
offline suite, tiny's training split has 256 examples), floor 1e-6, normalize on.

Memory: the merge is incremental, task by task: two running encoder-sized float32 sums
(sum c F theta and sum c F), one boolean "informative" mask, one fine-tuned encoder and
that model's Fisher; never the K Fishers or the K models at once.

Device: the per-example forward and backward passes run on the run's device under its
precision (autocast); each task's Fisher comes back to the CPU, where the weighted
average is taken in float32.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.device import autocast, to_device
from mergebench.exemplars import example_count, select_examples, task_exemplars
from mergebench.hyperparameters import Bool, Float, Int
from mergebench.merging import finetuned_mean
from mergebench.method import Method, StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import register_method
from mergebench.task import OUTPUT_PER_INPUT


def varying_keys(pool: ModelPool) -> set[str]:
    """Merged keys whose value differs between at least two fine-tuned checkpoints
    (read tensor by tensor: K copies of one tensor at a time)."""
    varying = set()
    for key in tqdm(pool.merged_keys, desc="comparing checkpoints", unit="tensor", leave=False):
        first = pool.finetuned(pool.tasks[0], key)
        if any(not torch.equal(first, pool.finetuned(task, key)) for task in pool.tasks[1:]):
            varying.add(key)
    return varying


# --- the Fisher ----------------------------------------------------------------------
def diagonal_fisher(
    encoder: nn.Module, head: nn.Module, inputs: Mapping[str, Any], keys: set[str] | None = None,
    device: torch.device = torch.device("cpu"), precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """F[key] = 1/N sum_n sum_y p(y|x_n) (d log p(y|x_n) / d theta[key])^2 for every
    parameter of ``encoder`` named in ``keys`` (all parameters if None), logits being
    ``head(encoder(**x_n))``. Examples are taken one at a time (per-example gradients);
    the C class gradients of an example share one forward pass. Tied parameters get the
    Fisher of the shared tensor under each of their names. A one-output (regression) head
    is a unit-variance Gaussian likelihood, whose Fisher is (d f / d theta)^2 (a softmax
    over one output would be constant, its Fisher zero). ``encoder`` and ``head`` are on
    ``device``, where each example goes and runs forward under ``precision`` (autocast; the
    log-likelihood and the squared gradients are float32); the Fisher comes back on the CPU."""
    named = dict(encoder.named_parameters(remove_duplicate=False))
    wanted = [name for name in named if keys is None or name in keys]
    unique: list[nn.Parameter] = []
    index: dict[int, int] = {}
    for name in wanted:
        parameter = named[name]
        if id(parameter) not in index:
            index[id(parameter)] = len(unique)
            unique.append(parameter)
    wanted_ids = set(index)
    for parameter in encoder.parameters():
        parameter.requires_grad_(id(parameter) in wanted_ids)
    head.requires_grad_(False)
    encoder.eval()
    head.eval()

    sums = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in unique]
    n = example_count(inputs)
    if unique:
        for i in tqdm(range(n), desc="fisher", unit="example", leave=False):
            with autocast(device, precision):
                logits = head(encoder(**to_device(select_examples(inputs, i, i + 1), device)))
            if logits.dim() != 2 or logits.shape[0] != 1:
                raise ValueError(
                    f"fisher: expected logits of shape (1, classes) for one example, got {tuple(logits.shape)}"
                )
            if logits.shape[1] == 1:  # a regression head (STS-B): Gaussian likelihood, unit variance
                grads = torch.autograd.grad(logits[0, 0].float(), unique, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        grad = grad.to(total.dtype)
                        total.addcmul_(grad, grad)
                continue
            log_probs = torch.log_softmax(logits[0].float(), dim=-1)
            probs = log_probs.detach().exp()
            classes = [c for c in range(log_probs.numel()) if probs[c] > 0]
            for j, c in enumerate(classes):
                grads = torch.autograd.grad(
                    log_probs[c], unique, retain_graph=j < len(classes) - 1, allow_unused=True
                )
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        grad = grad.to(total.dtype)
                        total.addcmul_(grad, grad, value=float(probs[c]))
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return {name: (sums[index[id(named[name])]] / n).cpu() for name in wanted}


def fisher_norm(fisher: Mapping[str, torch.Tensor]) -> float:
    """||F||_2 over all entries (the authors' ``_l2_norm_of_fisher``)."""
    return float(torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values())))


# --- the method ------------------------------------------------------------------------
@register_method("fisher")
class FisherMerging(Method):
    needs_exemplars = True
    # the Fisher is that of a classifier's softmax over one output per example; a detector's
    # set prediction (per-query classes and boxes) has no such likelihood here (see README, RF100)
    requires = frozenset({OUTPUT_PER_INPUT})
    hyperparameters = {
        "exemplars": Int(256, "N: unlabelled training inputs per task the Fisher is estimated on", 1),
        "fisher_floor": Float(1e-6, "added to every Fisher entry so no weight has zero total weight", 0.0,
                              low_open=True),
        "normalize": Bool(True, "weight each task by 1 / the norm of its Fisher, as the authors' normalize_fishers"),
    }

    def merge(self, pool, exemplars=None):
        floor = float(self.hparams["fisher_floor"])
        normalize = self.hparams["normalize"]
        inputs = {task: task_exemplars(self.name, exemplars, task) for task in pool.tasks}
        backbone = pool.backbone

        varying = varying_keys(pool)
        numerator: dict[str, torch.Tensor] = {}
        denominator: dict[str, torch.Tensor] = {}
        informative: dict[str, torch.Tensor] = {}
        encoder = backbone.build_encoder().to(self.device)  # the forward/backward passes run on the run's device
        for task in tqdm(pool.tasks, desc=self.name, unit="task", leave=False):
            encoder.load_state_dict(pool.finetuned_state(task), strict=True)
            fisher = diagonal_fisher(encoder, backbone.task(task).head().to(self.device), inputs[task], keys=varying,
                                     device=self.device, precision=self.precision)
            norm = fisher_norm(fisher) if normalize else 1.0
            scale = 1.0 / norm if norm > 0 else 1.0
            theta = encoder.state_dict()
            for key in varying:
                value = theta[key].detach().cpu()
                f = fisher.get(key)
                if f is None:  # a floating buffer: no gradient, zero Fisher
                    f = torch.zeros(value.shape, dtype=torch.promote_types(value.dtype, torch.float32))
                floored = f.clamp(min=floor) * scale
                if key not in numerator:
                    numerator[key] = torch.zeros_like(floored)
                    denominator[key] = torch.zeros_like(floored)
                    informative[key] = torch.zeros(value.shape, dtype=torch.bool)
                numerator[key].add_(floored * value.to(floored.dtype))
                denominator[key].add_(floored)
                informative[key] |= f > floor
            del fisher, theta

        state: dict[str, torch.Tensor] = {}
        first = pool.tasks[0]
        for key in pool.keys():
            pre = pool.pretrained(key)
            if key in varying:
                merged = numerator.pop(key) / denominator.pop(key)
                mask = informative.pop(key)
                if not bool(mask.all()):
                    merged = torch.where(mask, merged, finetuned_mean(pool, key).to(merged.dtype))
                state[key] = merged.to(pre.dtype).contiguous()
            elif key in pool.merged_keys:
                state[key] = pool.finetuned(first, key)  # identical in every fine-tuned model
            else:
                state[key] = pre
        return StaticMerged(backbone, state)
