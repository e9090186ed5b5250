"""A hand-sized backbone for method tests: tensors a (4,), b (2,), c (1,) and an
integer buffer, with checkpoints written as real safetensors files."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mergebench.backbone import Backbone
from mergebench.pool import ModelPool
from mergebench.task import Task, TaskData


class VectorEncoder(nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.flatten() for p in self.parameters()]).sum() * x


class StubData(TaskData):
    """Identity heads, one all-ones test batch, all-ones exemplars."""

    def head(self, task):
        return nn.Identity()

    def batches(self, task, split, batch_size):
        yield {"x": torch.ones(1)}, torch.zeros(1, dtype=torch.long)

    def exemplars(self, task, n, seed, split="train"):
        return {"x": torch.ones(n)}


class StubBackbone(Backbone):
    """Its tasks are the keys of ``finetuned``, two-class tasks reading ``data`` (StubData by default)."""

    name = "stub"
    suite = "stub"  # not registered: the stub's tasks are its own

    def __init__(self, root: Path, pretrained: dict, finetuned: dict[str, dict], data: TaskData | None = None):
        self.root = root
        self.shapes = {k: tuple(v.shape) for k, v in pretrained.items()}
        save_file({**pretrained, "count": torch.tensor([7])}, str(root / "pre.safetensors"))
        for task, state in finetuned.items():
            save_file({**state, "count": torch.tensor([7])}, str(root / f"{task}.safetensors"))
        self.task_names = tuple(finetuned)
        self.tasks = tuple(Task(t, ("no", "yes"), data=data or StubData()) for t in finetuned)

    def pretrained_checkpoint(self):
        return self.root / "pre.safetensors"

    def finetuned_checkpoint(self, task):
        return self.root / f"{task}.safetensors"

    def build_encoder(self):
        return VectorEncoder(self.shapes)


def tensors(**values) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def finetuned_from(pretrained: dict, *taus: dict) -> dict[str, dict]:
    """Fine-tuned states t1, t2, ... = pretrained + each task vector."""
    return {f"t{i}": {k: pretrained[k] + tau[k] for k in pretrained} for i, tau in enumerate(taus, 1)}


def make_pool(tmp_path: Path, pretrained: dict, finetuned: dict[str, dict]) -> ModelPool:
    return ModelPool(StubBackbone(tmp_path, pretrained, finetuned))


def merged_state(merged) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in merged.encoder.state_dict().items()}
