"""A synthetic ViT-B/32 backbone for cost benchmarks at paper scale without downloads.

"Pretrained": a randomly initialised CLIP ViT-B/32 vision tower (transformers
``CLIPVisionModel`` with the ViT-B/32 configuration, seeded; 87.5M parameters).
"Fine-tuned": K copies with task vectors of realistic statistics: per tensor,
tau = scale * rms(theta) * t / sd(t) with t Student-t (df 3: heavy tails, most
entries small) and scale 1e-3 (tensors whose pretrained values are all zero, the
biases at initialisation, take the rms of the whole model instead). Checkpoints
are safetensors files in a cache directory, so the real ``ModelPool`` reads them.
Images are random, with a fixed per-task offset pattern so that routers have
something to tell apart.

It is a benchmark fixture, not a suite: it is not in the production registry and
its accuracies mean nothing. Used by ``benchmarks/vit_b32_merge.py``.
"""
from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mergebench.backbone import Backbone
from mergebench.cache import cache_dir, write_atomically
from mergebench.task import Batch, Task, TaskData

VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32)
CLASSES = tuple(f"class-{i}" for i in range(10))


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


class PooledVision(nn.Module):
    """CLIP's vision tower; features = the pooled (post-LayerNorm CLS) output."""

    def __init__(self):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.model = CLIPVisionModel(CLIPVisionConfig(**VIT_B32))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


class SyntheticImages(TaskData):
    """Random images with a fixed pattern per task, random labels and seeded random heads."""

    def __init__(self, seed: int, test_examples: int):
        self.seed, self.test_examples = seed, test_examples

    def head(self, task: str) -> nn.Module:
        head = nn.Linear(VIT_B32["hidden_size"], len(CLASSES))
        generator = torch.Generator().manual_seed(_seed(self.seed, task, "head"))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
            head.bias.zero_()
        return head

    def _images(self, task: str, n: int, seed: int) -> torch.Tensor:
        size = VIT_B32["image_size"]
        pattern = torch.randn(3, size, size, generator=torch.Generator().manual_seed(_seed(self.seed, task, "pattern")))
        noise = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(_seed(seed, task, "images")))
        return noise + pattern

    def batches(self, task: str, split: str, batch_size: int) -> Iterator[Batch]:
        images = self._images(task, self.test_examples, _seed(split))
        labels = torch.randint(len(CLASSES), (self.test_examples,), generator=torch.Generator().manual_seed(_seed(task)))
        for start in range(0, self.test_examples, batch_size):
            yield {"pixel_values": images[start : start + batch_size]}, labels[start : start + batch_size]

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        return {"pixel_values": self._images(task, n, _seed(seed, split))}


class SyntheticViTB32(Backbone):
    name = "synthetic-vit-b32"
    suite = "synthetic"
    description = "random-init CLIP ViT-B/32 + K Student-t task vectors (cost benchmarks only)"

    def __init__(self, root: Path | None = None, num_tasks: int = 8, seed: int = 0, scale: float = 1e-3,
                 df: float = 3.0, test_examples: int = 16, **locations: Any):
        super().__init__(**locations)
        self.num_tasks, self.seed, self.scale, self.df, self.test_examples = num_tasks, seed, scale, df, test_examples
        self.root = Path(root) if root else cache_dir() / "benchmarks" / f"{self.name}-k{num_tasks}-s{seed}-{scale:g}-t{df:g}"

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(f"task-{k}" for k in range(self.num_tasks))

    @cached_property
    def tasks(self) -> tuple[Task, ...]:
        data = SyntheticImages(self.seed, self.test_examples)
        return tuple(Task(name, CLASSES, data=data) for name in self.task_names)

    def pretrained_checkpoint(self) -> Path:
        return self.root / "pretrained.safetensors"

    def finetuned_checkpoint(self, task: str) -> Path:
        self.check_task(task)
        return self.root / f"{task}.safetensors"

    def build_encoder(self) -> nn.Module:
        return PooledVision()

    def prepare(self, force: bool = False) -> None:
        """Write the pretrained checkpoint and the K fine-tuned ones (about 350 MB each) if missing."""
        if force or not self.pretrained_checkpoint().exists():
            torch.manual_seed(self.seed)
            state = {k: v.contiguous() for k, v in PooledVision().state_dict().items()}
            write_atomically(self.pretrained_checkpoint(), lambda tmp: save_file(state, str(tmp)))
        missing = [t.name for t in self.tasks if force or not self.finetuned_checkpoint(t.name).exists()]
        if not missing:
            return
        from safetensors.torch import load_file

        pretrained = load_file(str(self.pretrained_checkpoint()))
        weights = torch.cat([v.flatten() for v in pretrained.values() if v.dim() > 1])
        fallback = float(weights.pow(2).mean().sqrt())
        for task in tqdm(missing, desc=f"{self.name}: writing task vectors", unit="task"):
            rng = np.random.default_rng(_seed(self.seed, task, "tau"))
            state = {}
            for key, theta in pretrained.items():
                rms = float(theta.pow(2).mean().sqrt()) or fallback
                t = rng.standard_t(self.df, size=theta.shape).astype(np.float32)
                t /= np.sqrt(self.df / (self.df - 2))  # unit variance
                state[key] = (theta + torch.from_numpy(t) * (self.scale * rms)).contiguous()
            write_atomically(self.finetuned_checkpoint(task), lambda tmp: save_file(state, str(tmp)))
