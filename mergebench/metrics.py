"""The metrics of the suites' tasks: accuracy, Matthews correlation (CoLA) and the mean of
Pearson and Spearman (STS-B).

Each metric is written once, over rows of example indices: ``rows`` (B, n) selects B
samples of a split's predictions and labels and gives B values, vectorised. A whole split
is the one row ``0..n-1`` (``accuracy`` etc.); the bootstrap (``mergebench.bootstrap``)
passes its resamples, so an interval is computed by the same code as the figure it brackets.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _counts(codes: np.ndarray, size: int) -> np.ndarray:
    """(B, size) counts of the codes of each row of ``codes`` (B, n)."""
    offsets = np.arange(len(codes))[:, None] * size
    return np.bincount((codes + offsets).ravel(), minlength=len(codes) * size).reshape(len(codes), size)


def accuracy_rows(predictions: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (predictions == labels)[rows].mean(axis=1)


def matthews_rows(predictions: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K) per row; 0 where it is
    undefined (a constant side)."""
    classes = np.union1d(predictions, labels)
    k = len(classes)
    codes = np.searchsorted(classes, labels) * k + np.searchsorted(classes, predictions)
    confusion = _counts(codes[rows], k * k).reshape(-1, k, k).astype(np.float64)
    t, p = confusion.sum(2), confusion.sum(1)
    c, s = np.trace(confusion, axis1=1, axis2=2), confusion.sum((1, 2))
    numerator = c * s - (t * p).sum(1)
    denominator = np.sqrt((s**2 - (p * p).sum(1)) * (s**2 - (t * t).sum(1)))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    numerator = (x * y).sum(1)
    denominator = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _average_ranks_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """1-based ranks within each row, ties sharing their mean rank (scipy.stats.rankdata's
    "average"): a value's count of smaller values in its row plus half its own count, plus
    one half, read from per-row counts of the distinct values."""
    distinct, group = np.unique(values, return_inverse=True)
    counts = _counts(group.reshape(-1)[rows], len(distinct))
    smaller = np.cumsum(counts, axis=1) - counts
    average = smaller + (counts + 1) / 2
    return np.take_along_axis(average, group.reshape(-1)[rows], axis=1)


def pearson_spearman_rows(predictions: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean of Pearson's r and Spearman's rho between scores and gold scores per row: GLUE's
    STS-B figure as the merging papers report it. A constant side counts as no correlation
    (0), as for Matthews."""
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    pearson = _pearson_rows(x[rows], y[rows])
    spearman = _pearson_rows(_average_ranks_rows(x, rows), _average_ranks_rows(y, rows))
    return (pearson + spearman) / 2


RowMetric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
ROW_METRICS: dict[str, RowMetric] = {"accuracy": accuracy_rows, "matthews": matthews_rows,
                                     "pearson_spearman": pearson_spearman_rows}


def _whole_split(metric: RowMetric, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The metric of the whole split (NaN for an empty one, which evaluation refuses to record)."""
    if not len(labels):
        return float("nan")
    return float(metric(np.asarray(predictions), np.asarray(labels), np.arange(len(labels))[None, :])[0])


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return _whole_split(accuracy_rows, predictions, labels)


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K), used for CoLA."""
    return _whole_split(matthews_rows, predictions, labels)


def pearson_spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean of Pearson's r and Spearman's rho (STS-B)."""
    return _whole_split(pearson_spearman_rows, predictions, labels)


METRICS = {"accuracy": accuracy, "matthews": matthews_correlation, "pearson_spearman": pearson_spearman}
