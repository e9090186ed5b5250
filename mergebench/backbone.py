"""Backbone: a pretrained model family and its fine-tuned checkpoints, weights only.

Its *encoder* (the part that is merged) is an ``nn.Module`` whose ``forward(**inputs)``
returns the features of a batch; everything else a task needs (its head, data, metric
and what routing reads) belongs to the Task (``mergebench.task``), which the backbone's
suite declares. Checkpoints are safetensors files so that the ModelPool can read them
tensor by tensor (bounded memory) and nothing is ever unpickled.
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Iterator, Mapping

import torch
from torch import nn

from mergebench.registry import SUITES
from mergebench.task import Task


class Backbone(abc.ABC):
    name: ClassVar[str]
    suite: ClassVar[str]  # the name of its Suite (``mergebench.registry.SUITES``)
    task_names: ClassVar[tuple[str, ...]]  # the suite's tasks it has fine-tuned checkpoints for, in table order
    description: ClassVar[str] = ""
    # where ``prepare`` fine-tunes locally (``mergebench prepare --device``); checkpoints are
    # always written from CPU float32 tensors, and a backbone that only converts ignores it
    prepare_device: torch.device = torch.device("cpu")
    # SHA-256 of the prepare manifest (``mergebench.manifest``) of the checkpoints the committed
    # results were scored with, for a backbone fine-tuned locally; ``prepare`` says whether it
    # reproduced them. None: nothing to compare with.
    reference_checkpoints: ClassVar[str | None] = None

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

    # --- checkpoints -------------------------------------------------------
    @abc.abstractmethod
    def pretrained_checkpoint(self) -> Path:
        """Safetensors file of the pretrained encoder state dict."""

    @abc.abstractmethod
    def finetuned_checkpoint(self, task: str) -> Path:
        """Safetensors file of the encoder fine-tuned on ``task``."""

    def prepare(self, force: bool = False) -> None:
        """Create whatever is missing (converted or locally fine-tuned checkpoints, data caches)."""

    def data_manifest_hash(self) -> str | None:
        """SHA-256 of the manifest that pins the evaluation data, for a suite that ships its data
        (the mini suite): results on different data must never be ranked together. None: the
        data is read from elsewhere, unpinned."""
        return None

    def shipped_validation_size(self, task: str) -> int:
        """How many examples the task's own validation split has (held out from its training and
        test splits; ``Task.batches("validation", ...)`` reads it); 0 where the suite ships none,
        and hyperparameter selection then carves one from training (``mergebench.selection``)."""
        return 0

    def check_task(self, task: str) -> None:
        """KeyError naming the valid tasks unless the backbone has a checkpoint for ``task``."""
        if task not in self.task_names:
            raise KeyError(f"backbone {self.name!r} has no task {task!r}; its tasks: {', '.join(self.task_names)}")

    # --- the encoder ---------------------------------------------------------
    @abc.abstractmethod
    def build_encoder(self) -> nn.Module:
        """A fresh encoder module (weights are loaded by the caller); its output are the features."""

    def encoder_holding(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The encoder whose parameters and buffers are the tensors of ``state`` (every key,
        strict), in eval mode. Its parameters are built on the meta device, so no random
        initialisation runs and no memory is written only to be overwritten, and the state's
        tensors become the module's (no copy; one whose dtype differs from the module's is
        cast, as ``load_state_dict`` would). Buffers outside the state (non-persistent ones,
        e.g. position ids) are built as usual. An encoder that cannot be built that way is
        built and loaded the plain way."""
        try:
            with _parameters_on_meta():
                encoder = self.build_encoder()
        except Exception:  # a constructor that computes with its parameters: the plain way below
            encoder = None
        if encoder is not None:
            expected = encoder.state_dict(keep_vars=True)
            state = {key: _as_dtype(value, expected[key]) if key in expected else value for key, value in state.items()}
            encoder.load_state_dict(state, strict=True, assign=True)
            if not any(t.is_meta for t in (*encoder.parameters(), *encoder.buffers())):
                return encoder.eval()
        encoder = self.build_encoder()
        encoder.load_state_dict(dict(state), strict=True)
        return encoder.eval()

    def is_merged(self, key: str, dtype: torch.dtype | None) -> bool:
        """Which tensors merging methods touch: every floating-point tensor (dtype None: not floating)."""
        return dtype is not None

    # --- its tasks ----------------------------------------------------------------
    @cached_property
    def tasks(self) -> tuple[Task, ...]:
        """The tasks it has checkpoints for, bound to its data: their inputs come through its
        tokenizer or image processor, their heads from its fine-tuned checkpoints."""
        return SUITES.get(self.suite).bind(self)

    def task(self, name: str) -> Task:
        self.check_task(name)
        return next(task for task in self.tasks if task.name == name)


def _as_dtype(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype) if value.dtype != like.dtype and like.is_floating_point() else value


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (their
    initialisation then costs nothing), buffers stay real: the technique of accelerate's
    ``init_empty_weights``. Not thread-safe: it patches ``nn.Module.register_parameter``."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and type(param) is nn.Parameter and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
