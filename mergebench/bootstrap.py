"""Seeded percentile-bootstrap confidence intervals of a run's task metrics and suite average.

Evaluation keeps each task's per-example predictions and labels (``task_sample``); each task's
test examples are resampled with replacement independently of the other tasks, every metric
is recomputed on every resample, and the suite average of a resample is the mean of its task
metrics. The interval is the 2.5th and 97.5th percentiles of those B values (Efron &
Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13). Metrics that are not a mean of
per-example scores (Matthews correlation, Pearson/Spearman) are recomputed exactly on each
resample by the metrics' own code (``mergebench.metrics``), vectorised over a (B, n) array
of resample indices. A detection task's mAP@50 runs the COCO evaluator over a whole split,
far too slow a thousand times per run; its interval, and then the average's, is null.

Draws: ``numpy.random.default_rng(seed)``; for each task in the metrics' order that has a
sample, ``rng.integers(0, n, size=(B, n))`` (one row of indices per resample), so the same
seed and samples give the same interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mergebench.metrics import ROW_METRICS

# 1,000 resamples: the Monte Carlo error of a 2.5 % / 97.5 % percentile is then well under the
# interval's own width (Efron & Tibshirani 1993, sec. 19.3, recommend B >= 1000 for percentile
# intervals), and one run's resampling stays a fraction of a second per task.
RESAMPLES = 1000
LEVEL = 0.95
SEED = 0  # recorded with the interval; fixed, so reruns of one evaluation give one interval
METHOD = "percentile bootstrap over test examples, each task resampled independently"


@dataclass(frozen=True)
class Sample:
    """One task's scored test split, per example: what a bootstrap resamples."""

    metric: str
    predictions: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def task_sample(task: Any, outputs: Sequence[Any], targets: Sequence[Any]) -> Sample | None:
    """The per-example predictions and labels ``Task.score`` reads (the argmax of class
    logits, or a regression task's single output), or None for a task scored otherwise
    (detection's mAP@50 over boxes)."""
    if task.outputs not in ("class-logits", "regression") or task.metric not in ROW_METRICS:
        return None
    regression = task.outputs == "regression"
    predictions = np.concatenate([(o[..., 0].float() if regression else o.argmax(-1)).numpy() for o in outputs])
    labels = np.concatenate([np.asarray(t.numpy() if hasattr(t, "numpy") else t) for t in targets])
    return Sample(task.metric, predictions, labels)


def resampled_metric(sample: Sample, rows: np.ndarray) -> np.ndarray:
    """The task's metric on each resample: ``rows`` is (B, n) indices into the sample (the
    metric's one implementation in ``mergebench.metrics``)."""
    return ROW_METRICS[sample.metric](sample.predictions, sample.labels, rows)


def _bounds(values: np.ndarray, estimate: float) -> list[float] | None:
    """The percentile interval of ``values``, or None where it leaves out ``estimate`` (a
    bootstrap distribution so skewed by a tiny split that it does not vouch for the estimate)."""
    alpha = (1 - LEVEL) / 2
    low, high = (float(v) for v in np.percentile(values, [100 * alpha, 100 * (1 - alpha)]))
    low, high = max(low, -1.0), min(high, 1.0)  # float round-off only: metrics are within [-1, 1]
    tolerance = 1e-12
    if not (math.isfinite(low) and math.isfinite(high) and low - tolerance <= estimate <= high + tolerance):
        return None
    return [min(low, estimate), max(high, estimate)]


def suite_interval(samples: Mapping[str, Sample | None], metrics: Mapping[str, float], *, seed: int = SEED,
                   resamples: int = RESAMPLES) -> dict[str, Any]:
    """The record's ``interval``: the percentile bootstrap interval (``LEVEL``) of the suite
    average and of each task's metric, from ``resamples`` resamples drawn with ``seed``. A task
    without a sample, or whose sample does not reproduce its recorded metric, has a null
    interval, and then so has the average (it cannot be resampled without that task)."""
    rng = np.random.default_rng(seed)
    tasks: dict[str, list[float] | None] = {}
    draws: list[np.ndarray] = []
    for task, value in metrics.items():
        sample = samples.get(task)
        if sample is None or not len(sample):
            tasks[task] = None
            continue
        rows = rng.integers(0, len(sample), size=(resamples, len(sample)))
        everything = np.arange(len(sample))[None, :]
        if not math.isclose(float(resampled_metric(sample, everything)[0]), value, rel_tol=1e-6, abs_tol=1e-9):
            tasks[task] = None  # the per-example sample is not what the task scored
            continue
        values = resampled_metric(sample, rows)
        draws.append(values)
        tasks[task] = _bounds(values, value)
    average = None
    if len(draws) == len(metrics):
        average = _bounds(np.mean(draws, axis=0), math.fsum(metrics.values()) / len(metrics))
    return {"method": METHOD, "level": LEVEL, "resamples": resamples, "seed": seed, "average": average,
            "tasks": tasks}
