"""Evaluation of a Merged model over the tasks of a suite."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from mergebench.backbone import Backbone
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


METRICS = {"accuracy": accuracy, "matthews": matthews_correlation}


def classification_score(metric: str, outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    """A METRICS entry on the argmax predictions of a split's logits (one tensor per batch)."""
    predictions = np.concatenate([output.argmax(-1).numpy() for output in outputs])
    return METRICS[metric](predictions, np.concatenate([batch.numpy() for batch in labels]))


def evaluate_task(merged: Merged, backbone: Backbone, task: str, batch_size: int = 64) -> float:
    """The task's metric on its test split. ``Backbone.score`` reads the raw outputs of the
    whole split (logits for classification; logits and boxes for detection's mAP)."""
    outputs, targets = [], []
    with torch.no_grad():
        for inputs, batch_targets in tqdm(
            backbone.batches(task, "test", batch_size), desc=f"eval {task}", unit="batch", leave=False
        ):
            outputs.append(merged.predict(task, inputs))
            targets.append(batch_targets)
    return backbone.score(task, outputs, targets)


def evaluate(merged: Merged, backbone: Backbone, tasks: list[str], batch_size: int = 64) -> dict[str, float]:
    return {task: evaluate_task(merged, backbone, task, batch_size) for task in tasks}
