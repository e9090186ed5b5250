"""The two reference rows of every table: Pretrained (no merge: the lower bound)
and Individual (each task evaluated with its own fine-tuned encoder: the upper
bound). Individual keeps all K fine-tuned checkpoints, so its extra storage is
their size on disk."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mergebench.method import Merged, Method, StaticMerged
from mergebench.registry import register_method


@register_method("pretrained")
class Pretrained(Method):
    reference = True

    def merge(self, pool, exemplars=None):
        return StaticMerged(pool.backbone, pool.pretrained_state())


class PerTaskEncoders(Merged):
    """One fine-tuned encoder per task, loaded when its task is evaluated."""

    def __init__(self, pool):
        super().__init__(pool.backbone)
        self.pool = pool
        self.encoder = pool.backbone.build_encoder().eval()
        self._loaded: str | None = None

    @torch.no_grad()
    def predict(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self._loaded != task:
            self.encoder.load_state_dict(self.pool.finetuned_state(task), strict=True)
            self._loaded = task
        return self.head(task)(self.encoder(**inputs))

    def artifacts(self):
        return {f"{task}.safetensors": path for task, path in self.pool.checkpoint_paths().items()}


@register_method("individual")
class Individual(Method):
    reference = True
    uses_task_identity = True
    dynamic = True

    def merge(self, pool, exemplars=None):
        return PerTaskEncoders(pool)
