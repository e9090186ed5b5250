"""Evaluation of a Merged model over the tasks of a suite."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mergebench.bootstrap import Sample, task_sample
from mergebench.device import autocast, to_cpu_float, to_device
from mergebench.errors import NonFiniteError
from mergebench.loading import default_workers
from mergebench.method import Merged
from mergebench.task import Task


def evaluate_task(merged: Merged, task: Task, batch_size: int = 64, precision: str = "fp32",
                  workers: int | None = None, samples: dict[str, Sample | None] | None = None) -> float:
    """The task's metric on its test split. ``Task.score`` reads the raw outputs of the
    whole split (logits or scores; logits and boxes for detection's mAP). The batches are
    built by ``workers`` DataLoader processes (None: ``default_workers`` of the device) and
    pinned in memory on CUDA, so the device is not kept waiting for decoding or tokenising.
    ``samples``, when given, gets the task's per-example predictions and labels (``score_split``)."""
    return score_split(merged, task, evaluation_batches(merged, task, batch_size, workers), "test", precision,
                       samples)


def evaluation_batches(merged: Merged, task: Task, batch_size: int, workers: int | None = None) -> Iterable[tuple[Any, Any]]:
    """The task's test batches for a model on its device (see ``evaluate_task``)."""
    device = getattr(merged, "device", torch.device("cpu"))
    workers = default_workers(device) if workers is None else workers
    return task.batches("test", batch_size, workers=workers, pin_memory=device.type == "cuda")


def score_split(merged: Merged, task: Task, batches: Iterable[tuple[Any, Any]], split: str,
                precision: str = "fp32", samples: dict[str, Sample | None] | None = None) -> float:
    """The task's metric over ``batches`` of one split. Batches go to the device ``merged``
    is on and run under ``precision``; outputs come back to the CPU as float32; a
    non-finite output or metric raises NonFiniteError naming the task and split. ``samples``,
    when given, gets ``bootstrap.task_sample`` under the task's name: what a confidence
    interval resamples (None for a task scored otherwise, as detection)."""
    outputs, targets = [], []
    device = getattr(merged, "device", torch.device("cpu"))  # a Merged that never moved is on the CPU
    with torch.no_grad(), autocast(device, precision):
        for number, (inputs, batch_targets) in enumerate(tqdm(
            batches, desc=f"{'eval' if split == 'test' else split} {task.name}", unit="batch", leave=False
        )):
            output = to_cpu_float(merged.predict(task.name, to_device(inputs, device)))
            if not all_finite(output):
                raise NonFiniteError(f"task {task.name!r}: the outputs of {split} batch {number} have NaN or "
                                     f"infinite values")
            outputs.append(output)
            targets.append(batch_targets)
    score = task.score(outputs, targets)
    if not math.isfinite(score):
        what = task.metric if split == "test" else f"{split} {task.metric}"
        raise NonFiniteError(f"task {task.name!r}: its {what} is {score} (an empty {split} split?)")
    if samples is not None:
        samples[task.name] = task_sample(task, outputs, targets)
    return float(score)


def all_finite(output: Any) -> bool:
    """Every floating-point tensor in an output (a tensor, or a mapping / sequence of them,
    as a detector's logits and boxes) is finite."""
    if isinstance(output, torch.Tensor):
        return not output.is_floating_point() or bool(torch.isfinite(output).all())
    if isinstance(output, Mapping):
        return all(all_finite(value) for value in output.values())
    if isinstance(output, (list, tuple)):
        return all(all_finite(value) for value in output)
    return True


def evaluate(merged: Merged, tasks: Sequence[Task], batch_size: int = 64, precision: str = "fp32",
             workers: int | None = None, samples: dict[str, Sample | None] | None = None) -> dict[str, float]:
    """Task name -> its metric on the test split, in the order of ``tasks`` (``workers``,
    ``samples``: see ``evaluate_task``)."""
    return {task.name: evaluate_task(merged, task, batch_size, precision, workers, samples) for task in tasks}
