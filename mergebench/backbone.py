"""Backbone and Task: what a suite plugin provides to the harness.

A Backbone is a pretrained model family with fine-tuned checkpoints for the tasks
of its suite. Its *encoder* (the part that is merged) is an ``nn.Module`` whose
``forward(**inputs)`` returns one feature vector per input; each task keeps its own
fixed head on top, which no method merges (as in the papers).
Checkpoints are safetensors files so that the ModelPool can read them tensor by
tensor (bounded memory) and nothing is ever unpickled.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

Inputs = Mapping[str, torch.Tensor]  # one batch of model inputs, e.g. input_ids + attention_mask


from mergebench.errors import MissingResourceError  # noqa: E402  (re-exported)


@dataclass(frozen=True)
class Task:
    """An evaluation dataset with its label set and metric. A ``regression`` task (GLUE's
    STS-B) has one real-valued output per input, scored as it is rather than by argmax."""

    name: str
    classes: tuple[str, ...]
    metric: str = "accuracy"
    regression: bool = False


class Backbone(abc.ABC):
    name: ClassVar[str]
    suite: ClassVar[str]
    description: ClassVar[str] = ""
    task_type: ClassVar[str] = "classification"  # what its tasks are; methods declare which types they can merge

    def __init__(self, checkpoint_dir: Path | str | None = None, data_dir: Path | str | None = None):
        """``checkpoint_dir`` / ``data_dir``: local copies of the checkpoints and datasets a
        backbone would otherwise fetch from a hub (``mergebench run --checkpoint-dir/--data-dir``,
        or ``$MERGEBENCH_CHECKPOINT_DIR`` / ``$MERGEBENCH_DATA_DIR``)."""
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.data_dir = Path(data_dir) if data_dir else None

    @property
    def checkpoint_family(self) -> str | None:
        """Which family of checkpoints the weights come from, where a backbone reads several
        (e.g. "huggingface" or "open_clip"); recorded with every result."""
        return None

    @property
    @abc.abstractmethod
    def tasks(self) -> tuple[Task, ...]:
        """The tasks of the suite, in table order."""

    # --- checkpoints -------------------------------------------------------
    @abc.abstractmethod
    def pretrained_checkpoint(self) -> Path:
        """Safetensors file of the pretrained encoder state dict."""

    @abc.abstractmethod
    def finetuned_checkpoint(self, task: str) -> Path:
        """Safetensors file of the encoder fine-tuned on ``task``."""

    @classmethod
    def system_commands(cls) -> list[list[str]]:
        """Commands that install the system data this backbone needs (run by `prepare --install-data`)."""
        return []

    def prepare(self, force: bool = False) -> None:
        """Create whatever is missing (data caches, fine-tuned checkpoints)."""

    # --- modules ------------------------------------------------------------
    @abc.abstractmethod
    def build_encoder(self) -> nn.Module:
        """A fresh encoder module (weights are loaded by the caller)."""

    @abc.abstractmethod
    def head(self, task: str) -> nn.Module:
        """The task's fixed classification head (features -> logits)."""

    def is_merged(self, key: str, dtype: torch.dtype | None) -> bool:
        """Which tensors merging methods touch: every floating-point tensor (dtype None: not floating)."""
        return dtype is not None

    def routing_features(self, features: torch.Tensor) -> torch.Tensor:
        """What k-NN routers compare, from encoder features: (batch, D), one vector per input
        (default: the features, flattened), or (batch, T, D), T vectors per input whose
        votes are aggregated per input (DETR's object queries; see ``KNNRouter``)."""
        return features.reshape(len(features), -1)

    def score(self, task: str, outputs: list[torch.Tensor], targets: list[Any]) -> float:
        """The task's metric over a whole split, from the ``Merged.predict`` outputs and the
        targets of every batch of ``batches``. Default: the task's METRICS entry on the argmax
        (or regression) predictions; a backbone whose outputs are not logits (detection) overrides it."""
        from mergebench.evaluate import score_predictions  # evaluate imports this module

        return score_predictions(self.task(task), outputs, targets)

    # --- data -----------------------------------------------------------------
    @abc.abstractmethod
    def batches(self, task: str, split: str, batch_size: int) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """(inputs, targets) batches of a split ("train" or "test"), in a fixed order; targets are
        what ``score`` reads (class labels; image ids for detection)."""

    @abc.abstractmethod
    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        """Inputs (no labels) of ``n`` seeded examples of a split: "train" for exemplars,
        "test" for methods that adapt on unlabelled test inputs (AdaMerging's protocol)."""

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        valid = ", ".join(t.name for t in self.tasks)
        raise KeyError(f"backbone {self.name!r} has no task {name!r}; its tasks: {valid}")
