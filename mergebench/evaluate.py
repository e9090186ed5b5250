"""Evaluation of a Merged model over the tasks of a suite."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from mergebench.backbone import Backbone, Task
from mergebench.errors import NonFiniteError
from mergebench.method import Merged


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean()) if len(labels) else float("nan")


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K), used for CoLA."""
    classes = np.union1d(predictions, labels)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, predictions)), 1)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as scipy.stats.rankdata's "average")."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def pearson_spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean of Pearson's r and Spearman's rho between scores and gold scores: GLUE's STS-B
    figure as the merging papers report it. A constant side counts as no correlation (0),
    as for Matthews."""
    if not len(labels):
        return float("nan")
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return (_pearson(x, y) + _pearson(_average_ranks(x), _average_ranks(y))) / 2


METRICS = {"accuracy": accuracy, "matthews": matthews_correlation, "pearson_spearman": pearson_spearman}


def score_predictions(task: Task, outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    """A METRICS entry on a split's predictions (one output tensor per batch): the argmax of
    the logits, or the single output of a regression task (STS-B), as it is."""
    predictions = np.concatenate(
        [(output[..., 0].float() if task.regression else output.argmax(-1)).numpy() for output in outputs]
    )
    return METRICS[task.metric](predictions, np.concatenate([batch.numpy() for batch in labels]))


def evaluate_task(merged: Merged, backbone: Backbone, task: str, batch_size: int = 64) -> float:
    """The task's metric on its test split. ``Backbone.score`` reads the raw outputs of the
    whole split (logits or scores; logits and boxes for detection's mAP)."""
    outputs, targets = [], []
    with torch.no_grad():
        for number, (inputs, batch_targets) in enumerate(tqdm(
            backbone.batches(task, "test", batch_size), desc=f"eval {task}", unit="batch", leave=False
        )):
            output = merged.predict(task, inputs)
            if not all_finite(output):
                raise NonFiniteError(f"task {task!r}: the outputs of test batch {number} have NaN or infinite values")
            outputs.append(output)
            targets.append(batch_targets)
    score = backbone.score(task, outputs, targets)
    if not math.isfinite(score):
        raise NonFiniteError(f"task {task!r}: its {backbone.task(task).metric} is {score} (an empty test split?)")
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


def evaluate(merged: Merged, backbone: Backbone, tasks: list[str], batch_size: int = 64) -> dict[str, float]:
    return {task: evaluate_task(merged, backbone, task, batch_size) for task in tasks}
