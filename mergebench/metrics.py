"""The metrics of the suites' tasks, on a whole split's predictions and labels: accuracy,
Matthews correlation (CoLA) and the mean of Pearson and Spearman (STS-B)."""
from __future__ import annotations

import numpy as np


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
