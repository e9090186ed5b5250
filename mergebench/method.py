"""Method and Merged: the contract between merging algorithms and the harness.

A Method turns a ModelPool (and, if it asks for them, exemplars) into a Merged
model. A Merged model answers ``predict(task, inputs)`` and lists the
``artifacts()`` that must be stored beyond the pretrained weights; the storage a
method is charged is the byte length of those serialized artifacts, never a formula.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from mergebench.backbone import Backbone
from mergebench.errors import HyperparameterError, NonFiniteError, NotApplicableError  # noqa: F401  (re-exported)
from mergebench.hyperparameters import Hyperparameter, defaults, resolve
from mergebench.pool import ModelPool
from mergebench.suite import declared_tasks

Artifact = bytes | Path  # serialized bytes, or a file that is kept as it is


class Merged(abc.ABC):
    """What a method produces. What the method learned (coefficients, sparsity, bit-widths)
    is given at construction as ``diagnostics``, so that it reaches the run's record."""

    def __init__(self, backbone: Backbone, *, diagnostics: Mapping[str, Any] | None = None,
                 reused_training_seconds: float | None = None):
        self.backbone = backbone
        self._heads: dict[str, nn.Module] = {}
        self._learned = dict(diagnostics or {})
        self.reused_training_seconds = reused_training_seconds  # original cost of training read from a cache
        self.device = torch.device("cpu")

    def head(self, task: str) -> nn.Module:
        if task not in self._heads:
            self._heads[task] = self.backbone.task(task).head().eval().to(self.device)
        return self._heads[task]

    def use_heads(self, heads: Mapping[str, nn.Module]) -> None:
        """Heads given from elsewhere (an exported folder's) instead of the backbone's."""
        self._heads.update({task: head.eval().to(self.device) for task, head in heads.items()})

    def to(self, device: torch.device | str) -> "Merged":
        """Evaluate on ``device``: every module this model holds (encoders, heads, a router
        module) moves there once; inputs must then be on it too. A subclass holding plain
        tensors used at inference moves them in an override."""
        self.device = torch.device(device)
        for value in [*vars(self).values(), *self._heads.values()]:
            if isinstance(value, nn.Module):
                value.to(self.device)
        return self

    @abc.abstractmethod
    def predict(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Logits for one batch of the given task."""

    def artifacts(self) -> dict[str, Artifact]:
        """Named artifacts kept beyond the pretrained weights (empty: nothing extra)."""
        return {}

    def diagnostics(self) -> dict[str, Any]:
        """What the method learned, and figures measured during evaluation (e.g. routing accuracy)."""
        return dict(self._learned)

    def storage_bytes(self) -> int:
        return sum(a.stat().st_size if isinstance(a, Path) else len(a) for a in self.artifacts().values())


class StaticMerged(Merged):
    """One merged encoder for every task. It replaces the pretrained weights, so a
    static merge keeps nothing extra (the papers' tables print '-' for storage)."""

    def __init__(self, backbone: Backbone, state: Mapping[str, torch.Tensor], *,
                 diagnostics: Mapping[str, Any] | None = None):
        super().__init__(backbone, diagnostics=diagnostics)
        for key, tensor in state.items():  # a finite sum has finite terms: no tensor-sized temporary
            if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
                raise NonFiniteError(f"merged tensor {key!r} has NaN or infinite values")
        self.encoder = load_encoder(backbone, state)

    @torch.no_grad()
    def predict(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        return self.head(task)(self.encoder(**inputs))


def load_encoder(backbone: Backbone, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The backbone's encoder holding ``state`` (every key), in eval mode: its parameters are
    the state's tensors, built without initialisation (``Backbone.encoder_holding``)."""
    return backbone.encoder_holding(state)


def serialize_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Safetensors bytes of a state dict (the on-disk form of a dense artifact)."""
    return save_safetensors({k: v.contiguous() for k, v in state.items()})


class Method(abc.ABC):
    """A merging method. Subclasses set the class attributes and implement ``merge``.

    ``hyperparameters`` declares each hyperparameter once (type, default of the method's
    paper / authors' code, bounds, meaning); a run may override any of them by name, and
    every value is checked when the method is made, before any work starts.
    """

    name: ClassVar[str]  # set by ``register_method``
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {}
    needs_exemplars: ClassVar[bool] = False  # uses (unlabelled) training exemplars
    uses_task_identity: ClassVar[bool] = False  # needs to know the task at inference
    dynamic: ClassVar[bool] = False  # composes weights per input / per task at inference
    uses_test_inputs: ClassVar[bool] = False  # adapts on unlabelled test inputs (AdaMerging)
    reference: ClassVar[bool] = False  # Pretrained / Individual: bounds, not merges
    requires: ClassVar[frozenset[str]] = frozenset()  # Task capabilities every task must have (mergebench.task)
    # where a data-dependent method runs its forward/backward passes and under which autocast
    # precision (the run's --device/--precision, set by the runner); merging arithmetic stays fp32 on the CPU
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def __init__(self, **overrides: Any):
        self.hparams: dict[str, Any] = resolve(self.hyperparameters, overrides, f"method {self.name!r}")
        self.overrides: dict[str, Any] = {key: self.hparams[key] for key in overrides}  # what the run set
        self.check_hyperparameters()
        self.seed = 0

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Hyperparameter name -> default value."""
        return defaults(cls.hyperparameters)

    def check_hyperparameters(self) -> None:
        """Constraints between values that one declaration cannot express; raise
        HyperparameterError (called when the method is made, before any work)."""

    def resolved_hyperparameters(self, backbone: Backbone | type[Backbone]) -> dict[str, Any]:
        """Every hyperparameter as a merge on ``backbone`` uses it: what the record names.
        A method whose defaults depend on the backbone fills them in here, so that ``merge``
        never changes ``hparams``; HyperparameterError if a value does not apply to it."""
        return dict(self.hparams)

    @property
    def automatic(self) -> bool:
        """The papers' 'Automatic' column: no task identity needed at inference."""
        return not self.uses_task_identity

    def check_applicable(self, backbone: Backbone | type[Backbone]) -> None:
        """Raise NotApplicableError if a task of the backbone lacks a capability the method requires."""
        lacking = [task.name for task in declared_tasks(backbone) if not self.requires <= task.capabilities]
        if lacking:
            raise NotApplicableError(
                f"method {self.name!r} is not applicable to backbone {backbone.name!r}: it needs "
                f"{' and '.join(sorted(self.requires))} of every task, which task{'s' if len(lacking) > 1 else ''} "
                f"{', '.join(lacking)} {'lack' if len(lacking) > 1 else 'lacks'}"
            )

    @property
    def exemplars_per_task(self) -> int:
        return int(self.hparams.get("exemplars", 0)) if self.needs_exemplars else 0

    @abc.abstractmethod
    def merge(self, pool: ModelPool, exemplars: Mapping[str, Any] | None = None) -> Merged:
        """Build the merged model from the pool (and exemplars, if requested)."""

    def rebuild(self, pool: ModelPool, artifacts: Mapping[str, bytes]) -> Merged:
        """The Merged model of a dynamic method from its stored ``artifacts()`` alone, as
        ``mergebench.load`` reads an exported one back; ``pool`` is read only for its
        ``backbone``, ``tasks`` and ``pretrained_state()``. NotApplicableError where a method
        cannot (a static merge is exported as its weights instead)."""
        raise NotApplicableError(f"method {self.name!r} cannot rebuild its merged model from stored artifacts")
