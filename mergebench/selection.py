"""Hyperparameter selection on a validation split (``mergebench sweep --select-on validation``).

Where a suite ships a validation split held out from its training and test splits (the mini
suite: ``Backbone.shipped_validation_size``), selection scores on exactly that split, whole:
the record's ``selection`` says ``"split": "validation"``, its smallest per-task ``size`` and
every task's in ``sizes``. Elsewhere (GLUE's test split *is* its validation split; tiny and
the vision suites have none) the validation split of a task is a seeded subset of ``size``
examples of its *training* split (``"split": "train"``), taken generically from
``Task.batches("train", ...)``: the rows of each batch whose index was drawn, so any suite
whose batches are (a mapping of tensors with one row per example, a tensor or list of
targets) has one. Each grid point of a (method, backbone, seed) is merged and scored on it;
the best validation average (the first on a tie) is then run as usual, on the test split,
and its record carries ``selection``. Selection never reads a test split: the test labels
are read only by the final run of the chosen point. A carved split may overlap the
exemplars a method draws from the same training split (those are label-free); the record
keeps its seed and size, so it is repeatable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from mergebench.errors import HyperparameterError, NotApplicableError
from mergebench.evaluate import score_split
from mergebench.task import Batch, Task

SELECT_ON = ("validation",)


def check_selection(size: Any, seed: Any) -> tuple[int, int]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise HyperparameterError(f"--validation-size {size!r} is not allowed; expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise HyperparameterError(f"--validation-seed {seed!r} is not allowed; expected an integer in [0, {2**32 - 1}]")
    return size, seed


def _rows(value: Any, keep: list[int], count: int, task: Task) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and len(value) == count:
        return value[keep]
    if isinstance(value, (list, tuple)) and len(value) == count:
        return type(value)(value[i] for i in keep) if isinstance(value, list) else tuple(value[i] for i in keep)
    raise NotApplicableError(f"task {task.name!r}: its batches cannot be split into examples, so it has no "
                             "validation split; --select-on validation is not supported for its suite")


def validation_batches(task: Task, size: int, seed: int, batch_size: int = 64) -> Iterator[Batch]:
    """The (inputs, targets) batches of ``size`` seeded examples of the task's training split."""
    count = sum(len(targets) for _, targets in task.batches("train", batch_size))
    if size > count:
        raise HyperparameterError(f"--validation-size {size}: task {task.name!r} has {count} training examples")
    picks = np.sort(np.random.default_rng([seed, 0x5E1EC7]).choice(count, size=size, replace=False))
    start = 0
    for inputs, targets in task.batches("train", batch_size):
        n = len(targets)
        keep = [int(i) - start for i in picks[(picks >= start) & (picks < start + n)]]
        start += n
        if not keep:
            continue
        if not isinstance(inputs, Mapping):
            raise NotApplicableError(f"task {task.name!r}: its inputs are not a mapping of tensors, so it has no "
                                     "validation split; --select-on validation is not supported for its suite")
        yield {k: _rows(v, keep, n, task) for k, v in inputs.items()}, _rows(targets, keep, n, task)


def validation_split(backbone: Any, tasks: Sequence[str], size: int) -> dict[str, Any]:
    """Which examples selection scores on, as the record's ``selection`` states it: every
    task's shipped validation split where each of them ships one, else ``size`` examples
    carved from each task's training split."""
    shipped = {task: int(backbone.shipped_validation_size(task)) for task in tasks}
    if shipped and all(shipped.values()):
        return {"split": "validation", "size": min(shipped.values()), "sizes": shipped}
    return {"split": "train", "size": size}


def validation_metrics(merged: Any, tasks: Sequence[Task], size: int, seed: int, batch_size: int = 64,
                       precision: str = "fp32", split: str = "train") -> dict[str, float]:
    """Task name -> its metric on its validation split (never its test split): the shipped
    one (``split="validation"``) or ``size`` seeded examples of its training split."""
    if split not in ("train", "validation"):
        raise ValueError(f"selection split {split!r}: expected 'train' (carved) or 'validation' (shipped)")
    return {task.name: score_split(merged, task, task.batches("validation", batch_size) if split == "validation"
                                   else validation_batches(task, size, seed, batch_size), "validation", precision)
            for task in tasks}


@dataclass(frozen=True)
class Selection:
    """The chosen point of one (method, backbone, seed) and every point's validation average."""

    chosen: Any  # the sweep's Configuration
    validation_average: float
    averages: list[tuple[dict[str, Any], float]]


def select(configurations: Sequence[Any], size: int, seed: int, split: str = "train") -> Selection:
    """Merge each configuration (of one method, backbone and seed) and score it on the
    validation split (``split``: see :func:`validation_split`); the best validation average,
    the first on a tie."""
    from mergebench.runner import exemplars_for, load_pool, seed_everything, timed_merge

    averages = []
    for configuration in configurations:
        plan = configuration.plan
        backbone = plan.make_backbone()
        tasks = plan.task_names(backbone)  # less those the protocol leaves out
        with load_pool(backbone, tasks) as pool:
            seed_everything(plan.seed)
            exemplars = exemplars_for(plan.method, backbone, tasks, plan.seed)
            merged, _ = timed_merge(plan.method, pool, exemplars)
        merged.to(plan.device)
        metrics = validation_metrics(merged, [backbone.task(task) for task in tasks], size, seed, plan.batch_size,
                                     plan.precision, split)
        averages.append((configuration, float(np.mean(list(metrics.values())))))
    best = max(range(len(averages)), key=lambda i: (averages[i][1], -i))
    return Selection(averages[best][0], averages[best][1], [(c.hyperparameters, a) for c, a in averages])
