"""Evaluate a task-vector edit the way the papers' analyses do: each task with its
own (edited) task vector, the task identity known (Auto-FlexSwitch Sec. III-B,
"models equipped with task vectors derived from ..."), through the harness's own
``mergebench.evaluate``.

Results are cached per (checkpoints, edit, number of test examples) under
``$MERGEBENCH_CACHE/analyses/``, so that analyses sharing a point (the Individual
model, P-Spar in both the pulse and the B-Approx figures) evaluate it once, and a
table or figure can be redrawn without evaluating anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.analysis.edits import Edit
from mergebench.backbone import Backbone
from mergebench.cache import cache_dir, write_json
from mergebench.evaluate import evaluate
from mergebench.method import Merged
from mergebench.pool import ModelPool
from mergebench.task import Batch, Task, TaskData

CACHE_VERSION = 2  # 2: C2 (keep-low) prunes alpha from the top


class EditedTaskVectors(Merged):
    """Task k runs theta_pre + edit(tau_k): a fresh state per task, loaded when the
    evaluation reaches that task (one encoder in memory, whatever the number of tasks)."""

    def __init__(self, pool: ModelPool, edit: Edit):
        super().__init__(pool.backbone)
        self.pool = pool
        self.edit = edit
        self.pretrained = pool.pretrained_state()
        self.encoder = pool.backbone.build_encoder().eval()
        self.encoder.load_state_dict(self.pretrained, strict=True)
        self.loaded: str | None = None

    def state_for(self, task: str) -> dict[str, torch.Tensor]:
        state = dict(self.pretrained)
        for key in self.pool.merged_keys:
            tau = self.pool.task_vector(task, key)
            if torch.any(tau):  # unchanged tensors (e.g. frozen embeddings) have nothing to edit
                state[key] = (state[key] + self.edit.apply(task, key, tau).to(state[key].dtype)).contiguous()
        return state

    @torch.no_grad()
    def predict(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        if task != self.loaded:
            self.encoder.load_state_dict(self.state_for(task), strict=True)
            self.loaded = task
        return self.head(task)(self.encoder(**inputs))


class FirstTestExamples(TaskData):
    """Tasks' data seen through the first ``n`` examples of a split (None: all)."""

    def __init__(self, data: TaskData, n: int | None):
        if n is not None and n < 1:
            raise ValueError(f"--examples must be at least 1, got {n}")
        self.data = data
        self.n = n

    @classmethod
    def of(cls, tasks: Iterable[Task], n: int | None) -> list[Task]:
        """The tasks, each cut at its first ``n`` examples."""
        return [task.bind(cls(task.data, n)) for task in tasks]

    def classes(self, task: str) -> tuple[str, ...]:
        return self.data.classes(task)

    def head(self, task: str) -> nn.Module:
        return self.data.head(task)

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        return self.data.exemplars(task, n, seed, split)

    def batches(self, task: str, split: str, batch_size: int) -> Iterator[Batch]:
        left = self.n
        for inputs, labels in self.data.batches(task, split, batch_size):
            if left is not None:
                if left <= 0:
                    return
                inputs = {k: v[:left] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                labels = labels[:left]
                left -= len(labels)
            yield inputs, labels


def checkpoints_fingerprint(backbone: Backbone) -> str:
    """Identifies the checkpoints by path, size and modification time (not by content:
    hashing ~100 MB per task for every analysis would cost more than it protects)."""
    paths = [backbone.pretrained_checkpoint(), *(backbone.finetuned_checkpoint(t.name) for t in backbone.tasks)]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


class Prober:
    """Evaluates edits on a backbone's tasks, with the point cache."""

    def __init__(self, backbone: Backbone, examples: int | None = None, batch_size: int = 64,
                 cache: Path | None = None, use_cache: bool = True, device: torch.device | str = "cpu"):
        self.backbone = backbone
        self.device = torch.device(device)  # where evaluation runs, as in ``mergebench run``
        self.examples = examples
        self.batch_size = batch_size
        self.tasks = [task.name for task in backbone.tasks]
        self.cache_path = Path(cache) if cache else cache_dir() / "analyses" / f"{backbone.name}.json"
        self.use_cache = use_cache
        self.fingerprint = checkpoints_fingerprint(backbone)
        self.evaluated = 0  # points evaluated (not read from the cache) by this prober

    def _key(self, edit: Edit) -> str:
        # a point evaluated off the CPU is kept apart (its float rounding differs); CPU keys are as before
        where = [] if self.device.type == "cpu" else [self.device.type]
        return json.dumps([CACHE_VERSION, self.fingerprint, self.examples, edit.spec(), *where])

    def _load(self) -> dict[str, dict[str, float]]:
        if self.use_cache and self.cache_path.exists():
            return json.loads(self.cache_path.read_text())
        return {}

    def accuracy(self, edit: Edit, pool: ModelPool) -> dict[str, float]:
        """Per-task metric of every task running its own edited task vector."""
        key = self._key(edit)
        cached = self._load()
        if key in cached:
            return cached[key]
        metrics = evaluate(EditedTaskVectors(pool, edit).to(self.device),
                           FirstTestExamples.of(self.backbone.tasks, self.examples), self.batch_size)
        self.evaluated += 1
        if self.use_cache:
            cached = self._load()  # re-read: another analysis may have added points meanwhile
            cached[key] = metrics
            write_json(self.cache_path, cached)
        return metrics

    def run(self, edits: list[Edit], desc: str = "analysis") -> dict[str, dict[str, float]]:
        """{edit spec: {task: metric}} for every edit, with one progress bar over the points."""
        results = {}
        with ModelPool(self.backbone, self.tasks) as pool:
            for edit in tqdm(edits, desc=desc, unit="point"):
                results[edit.spec()] = self.accuracy(edit, pool)
        return results
