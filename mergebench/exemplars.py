"""Exemplars: the unlabelled inputs per task that data-driven methods learn from.

Drawn once per run with a seed (so every method asking for N per task sees the same
inputs), checked where a method takes them, sliced into batches, and run through an
encoder batch by batch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from mergebench.backbone import Backbone
from mergebench.device import autocast, to_cpu_float, to_device


def draw_exemplars(backbone: Backbone, tasks: list[str], n: int, seed: int, split: str = "train") -> dict[str, Any]:
    """The same seeded, label-free exemplars for every method asking for ``n`` per task."""
    return {task: backbone.task(task).exemplars(n, seed, split) for task in tasks}


def task_exemplars(method: str, exemplars: Mapping[str, Any] | None, task: str) -> Mapping[str, Any]:
    """The exemplar inputs of one task, or a clear error naming what is missing."""
    if exemplars is None:
        raise ValueError(f"method {method!r} needs exemplars (unlabelled training inputs) for every task; got none")
    if task not in exemplars:
        raise ValueError(
            f"method {method!r}: no exemplars for task {task!r}; tasks with exemplars: {sorted(exemplars)}"
        )
    inputs = exemplars[task]
    if example_count(inputs) == 0:
        raise ValueError(f"method {method!r}: the exemplars of task {task!r} are empty")
    return inputs


def example_count(inputs: Mapping[str, Any]) -> int:
    """N, the leading dimension shared by the input tensors of a batch."""
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"exemplar inputs must share one leading (example) dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def select_examples(inputs: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Examples start..stop-1 of a batch of inputs (non-tensor values pass through)."""
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}


@torch.no_grad()
def batched_features(encoder: Callable[..., torch.Tensor], inputs: Mapping[str, Any], batch_size: int = 64,
                     device: torch.device | None = None, precision: str = "fp32") -> torch.Tensor:
    """encoder(**inputs) over a large input batch, ``batch_size`` rows at a time, so that
    memory holds one batch's activations whatever the number of exemplars. With ``device``
    (where ``encoder`` runs) each batch goes there under ``precision`` and the features come
    back to the CPU as float32; without it everything stays where it is."""
    n = example_count(inputs)
    if device is None:
        return torch.cat([encoder(**select_examples(inputs, i, i + batch_size)) for i in range(0, n, batch_size)])
    with autocast(device, precision):
        return torch.cat([to_cpu_float(encoder(**to_device(select_examples(inputs, i, i + batch_size), device)))
                          for i in range(0, n, batch_size)])


def per_task_features(extract: Callable[..., torch.Tensor], exemplars: Mapping[str, Any],
                      tasks: list[str], device: torch.device | None = None, precision: str = "fp32") -> list[torch.Tensor]:
    """``extract`` over each task's exemplars, in task order (a router's training or query set),
    run on ``device`` under ``precision`` when given (``batched_features``)."""
    return [batched_features(extract, exemplars[task], device=device, precision=precision) for task in tasks]


def task_indices(groups: list[torch.Tensor]) -> torch.Tensor:
    """The task index of every row of the per-task groups, concatenated in task order."""
    return torch.cat([torch.full((len(group),), k) for k, group in enumerate(groups)])
