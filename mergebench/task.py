"""Task: an evaluation dataset of a suite, with its head, metric, splits, exemplars and
what routing reads from one input.

A suite declares its tasks once (name, the classes where no file is needed to know
them, metric, what the head outputs). A backbone's tasks are these declarations bound
to one TaskData, which reads the suite's files through that backbone: its tokenizer or
image processor makes the inputs, its fine-tuned checkpoints hold the heads.

Methods never ask what kind of task they merge. They declare the capabilities they need
(``Method.requires``) and each task lists those it has (``Task.capabilities``), so a new
kind of task (say, segmentation) is a Task subclass in its suite's module, with its own
``score``, ``routing_features`` and ``capabilities``, and no method changes.
"""
from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from mergebench.loading import split_batches
from mergebench.metrics import METRICS

# Capabilities (``Task.capabilities``, ``Method.requires``)
OUTPUT_PER_INPUT = "output_per_input"
"""The head gives one output vector per input, which softmax-based objectives (AdaMerging's
entropy, the Fisher's likelihood, FlexSwitch's KL and CKA losses) read as logits; the single
score of a regression task is such a vector."""
CLASS_DISTRIBUTION = "class_distribution"
"""That vector is the logits of a distribution over the task's classes."""

Batch = tuple[dict[str, Any], Any]  # (inputs, targets); the targets are what ``Task.score`` reads


class TaskData(abc.ABC):
    """What a suite's tasks read their files through, for one backbone: the datasets, the
    backbone's tokenizer or image processor that makes inputs of them, and the heads kept
    beside its fine-tuned checkpoints. A backbone's tasks share one, so that each dataset
    is loaded once."""

    @abc.abstractmethod
    def head(self, task: str) -> nn.Module:
        """The task's fixed head (encoder features -> outputs), which no method merges."""

    def batches(self, task: str, split: str, batch_size: int) -> Iterator[Batch]:
        """(inputs, targets) batches of a split ("train" or "test"), in a fixed order: by
        default ``batch`` over consecutive positions; a suite that reads only in order overrides it."""
        size = self.split_size(task, split)
        if size is None:
            raise NotImplementedError(f"{type(self).__name__} reads no batches of task {task!r}")
        for start in range(0, size, batch_size):
            yield self.batch(task, split, start, start + batch_size)

    def split_size(self, task: str, split: str) -> int | None:
        """How many examples a split has, for a suite that reads batches by position (``batch``),
        which evaluation's DataLoader workers then build; None: it reads only in order."""
        return None

    def batch(self, task: str, split: str, start: int, stop: int) -> Batch:
        """The (inputs, targets) batch of examples start..stop-1 of a split (``split_size``)."""
        raise NotImplementedError(f"{type(self).__name__} reads batches only in order")

    @abc.abstractmethod
    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        """Inputs (no labels) of ``n`` seeded examples of a split: "train" for exemplars,
        "test" for methods that adapt on unlabelled test inputs (AdaMerging's protocol)."""

    def classes(self, task: str) -> tuple[str, ...]:
        """The task's class names, for a suite whose files alone know them."""
        raise LookupError(f"the class names of task {task!r} are not declared")


class Task:
    """One task of a suite. ``outputs`` says what its head gives per input: "class-logits"
    or "regression" (GLUE's STS-B: one score, taken as it is); a subclass scores any other
    kind (the rf100 suite's "detection")."""

    test_limit: int | None = None  # score only the first N test examples (``limited``)
    test_scored: int | None = None  # test examples the latest pass yielded (``limited`` copies count)
    routes_by_parts: ClassVar[bool] = False
    """Routing reads one vector per part of an input (a detector's object queries),
    ``routing_features`` giving (batch, parts, D), rather than one vector per input."""

    def __init__(self, name: str, classes: Iterable[str] | None = None, metric: str = "accuracy", *,
                 outputs: str = "class-logits", data: TaskData | None = None):
        self.name = name
        self.metric = metric
        self.outputs = outputs
        self.data = data
        self._classes = tuple(classes) if classes is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, metric={self.metric!r}, outputs={self.outputs!r})"

    def bind(self, data: TaskData) -> Task:
        """This task reading its files through ``data``."""
        bound = copy.copy(self)
        bound.data = data
        return bound

    @property
    def classes(self) -> tuple[str, ...]:
        if self._classes is not None:
            return self._classes
        return self._data().classes(self.name)

    @property
    def capabilities(self) -> frozenset[str]:
        """What methods may rely on (module constants above)."""
        if self.outputs == "class-logits":
            return frozenset({OUTPUT_PER_INPUT, CLASS_DISTRIBUTION})
        if self.outputs == "regression":
            return frozenset({OUTPUT_PER_INPUT})
        return frozenset()

    # --- data and head, read through the bound TaskData ---------------------------------
    def head(self) -> nn.Module:
        return self._data().head(self.name)

    def batches(self, split: str, batch_size: int, *, workers: int = 0, pin_memory: bool = False) -> Iterator[Batch]:
        """The split's batches in order; with ``workers`` or ``pin_memory`` through a DataLoader
        (``mergebench.loading``), the same batches."""
        limit = self.test_limit if split == "test" and self.test_scored is not None else None
        batches = split_batches(self._data(), self.name, split, batch_size, workers=workers, pin_memory=pin_memory,
                                limit=limit)
        if split == "test" and self.test_scored is not None:
            return self._counted(first_examples(batches, self.test_limit, self.name))
        return batches

    def limited(self, examples: int | None) -> Task:
        """A copy scored on the first ``examples`` test examples in the split's order (a
        protocol's evaluation detail, e.g. the first 500 of each GLUE validation split; None:
        every one) that counts them in ``test_scored``, the count a record keeps."""
        limited = copy.copy(self)
        limited.test_limit, limited.test_scored = examples, 0
        return limited

    def _counted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        self.test_scored = 0  # the latest pass over the split
        for inputs, targets in batches:
            self.test_scored += len(targets)
            yield inputs, targets

    def exemplars(self, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        return self._data().exemplars(self.name, n, seed, split)

    def _data(self) -> TaskData:
        if self.data is None:
            raise LookupError(f"task {self.name!r} is declared but not bound to a backbone's data (Suite.bind)")
        return self.data

    # --- what evaluation and routing read -----------------------------------------------
    def score(self, outputs: list[torch.Tensor], targets: list[Any]) -> float:
        """The task's metric over a whole split, from the ``Merged.predict`` outputs and the
        targets of every batch: the metric of the argmax of the logits, or of a regression
        task's single output as it is."""
        regression = self.outputs == "regression"
        predictions = np.concatenate(
            [(output[..., 0].float() if regression else output.argmax(-1)).numpy() for output in outputs]
        )
        return METRICS[self.metric](predictions, np.concatenate([batch.numpy() for batch in targets]))

    def routing_features(self, features: torch.Tensor) -> torch.Tensor:
        """What routers compare, from encoder features: one vector per input, (batch, D)
        (the features, flattened); (batch, parts, D) for a task that ``routes_by_parts``."""
        return features.reshape(len(features), -1)


def first_examples(batches: Iterable[Batch], limit: int | None, task: str = "?") -> Iterator[Batch]:
    """The first ``limit`` examples of ``batches`` (None: all), in order: the batch that crosses
    the limit is cut (its input tensors and lists, and its targets, to their first rows), and no
    batch after it is read. Inputs must be a mapping whose entries have one row per example."""
    if limit is None:
        yield from batches
        return
    left = limit
    for inputs, targets in batches:
        if left <= 0:
            return
        n = len(targets)
        if n > left:
            inputs = {key: _first_rows(value, n, left, task, key) for key, value in inputs.items()}
            targets = _first_rows(targets, n, left, task, "targets")
        left -= min(n, left)
        yield inputs, targets
        if left <= 0:
            return


def _first_rows(value: Any, count: int, keep: int, task: str, key: str) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and len(value) == count:
        return value[:keep]
    if isinstance(value, (list, tuple)) and len(value) == count:
        return value[:keep]
    raise ValueError(f"task {task!r}: batch entry {key!r} has no row per example, so its first {keep} of "
                     f"{count} examples cannot be taken")


def routing_view(tasks: Iterable[Task]) -> Task:
    """The task whose ``routing_features`` and ``routes_by_parts`` a router uses for every
    one of ``tasks``. A router reads inputs whose task it does not know, so the tasks must
    read them alike (ValueError otherwise)."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks to route between")
    kinds = {(type(task).routing_features, task.routes_by_parts) for task in tasks}
    if len(kinds) > 1:
        raise ValueError(f"tasks {', '.join(t.name for t in tasks)} read routing features differently; "
                         "a router needs one way for all of them")
    return tasks[0]
