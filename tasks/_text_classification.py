"""Shared machinery of the offline text suites: a transformer encoder with mean
pooling, a fixed linear head per task, the seeded local fine-tuning recipe, and the
TaskData that the suites' tasks read their examples and heads through.

Recipe (the CLIP task-vector protocol transposed to text): the head of each task is
a linear probe fitted on frozen *pretrained* features, then frozen; the encoder is
fine-tuned under that fixed head. The Pretrained row is therefore the linear-probe
accuracy (the analogue of CLIP's zero-shot head), and only the encoder, the part
every method merges, carries what fine-tuning learned.
"""
from __future__ import annotations

import abc
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from mergebench.cache import cache_dir, write_json, write_safetensors
from mergebench.device import to_device
from mergebench.memory import available_ram
from mergebench.task import Batch, TaskData
from mergebench.tasks._prepared import PreparedBackbone

Example = tuple[str, int]


@contextmanager
def cpu_threads(count: int, device: torch.device) -> Iterator[None]:
    """Torch's intra-op threads set to ``count`` while fine-tuning on the CPU, restored after.

    A CPU matmul split over another number of threads rounds differently, so the same
    seeded recipe gives other checkpoints (and other results) with 1 and 2 threads; one
    thread makes the checkpoints depend on the recipe, the data and the library versions
    only, not on how many cores the preparing machine has. Another device is left alone."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _fine_tune_in_process(backbone: "TextClassificationBackbone", task: str) -> None:
    """One task's fine-tuning in a worker process: one thread, no per-step bar (several
    processes would draw over each other's)."""
    torch.set_num_threads(1)
    backbone._fine_tune(task, progress=False)


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder whose output is the attention-masked mean of its last hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class FineTuneRecipe:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    freeze_word_embeddings: bool = True  # halves CPU time; the embedding table is then not part of any task vector
    probe_examples: int = 1024
    probe_steps: int = 300
    probe_learning_rate: float = 1e-2
    seed: int = 0


@dataclass(frozen=True)
class TextData:
    classes: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    validation: tuple[Example, ...] = ()  # held out from training (hyperparameter selection); empty: none


class TextClassificationBackbone(PreparedBackbone):
    """Base of the offline text backbones; subclasses give the model, tokenizer and data.
    The backbone reads the data too: it fine-tunes its encoders on it."""

    recipe: ClassVar[FineTuneRecipe]
    # the most processes ``prepare`` fine-tunes tasks in at once on the CPU (each on one thread;
    # also bounded by the usable cores and the tasks missing); 1: one after another, in-process
    fine_tune_processes: ClassVar[int] = 1
    fine_tune_bytes: ClassVar[int] = 0  # peak memory of one fine-tuning process: the free RAM bounds them too

    def __init__(self, root: Path | None = None, **locations: Any):
        super().__init__(**locations)
        self.root = Path(root) if root is not None else cache_dir() / self.name / self._fingerprint()
        self._data: dict[str, TextData] = {}

    # --- what subclasses provide --------------------------------------------
    @abc.abstractmethod
    def build_data(self, task: str) -> TextData:
        """Build a task's dataset from its sources (called once; the result is cached as JSON)."""

    @abc.abstractmethod
    def new_model(self) -> nn.Module:
        """The transformer with pretrained weights."""

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask for a list of texts."""

    def version_key(self) -> dict[str, Any]:
        """Everything whose change must invalidate the cache."""
        return {"recipe": asdict(self.recipe), "tasks": self.task_names}

    def _fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.version_key(), sort_keys=True).encode()).hexdigest()[:12]

    # --- the encoder -----------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        return MeanPooledEncoder(self.new_model())

    # --- data -------------------------------------------------------------------
    def data(self, task: str) -> TextData:
        self.check_task(task)
        if task not in self._data:
            path = self.root / "data" / f"{task}.json"
            if not path.exists():
                data = self.build_data(task)
                write_json(path, {"classes": data.classes, "train": data.train, "test": data.test})
            raw = json.loads(path.read_text())
            self._data[task] = TextData(
                tuple(raw["classes"]), tuple(map(tuple, raw["train"])), tuple(map(tuple, raw["test"]))
            )
        return self._data[task]

    def shipped_validation_size(self, task: str) -> int:
        return len(self.data(task).validation)

    def examples(self, task: str, split: str) -> tuple[Example, ...]:
        data = self.data(task)
        valid = ("train", "validation", "test") if data.validation else ("train", "test")
        if split not in valid:
            raise ValueError(f"{self.name}/{task}: unknown split {split!r}; valid: {', '.join(valid)}")
        return getattr(data, split)

    # --- preparation ------------------------------------------------------------
    def prepare(self, force: bool = False) -> None:
        """Cache the data, save the pretrained encoder, and fine-tune every missing task."""
        for task in self.task_names:
            self.data(task)
        pretrained_path = self.root / "pretrained.safetensors"
        if force or not pretrained_path.exists():
            encoder = self.build_encoder()
            write_safetensors(pretrained_path, encoder.state_dict())
        missing = [t for t in self.task_names if force or not (self.root / f"{t}.safetensors").exists()]
        if missing:
            device = torch.device(self.prepare_device)
            processes = self._processes(len(missing)) if device.type == "cpu" else 1
            with cpu_threads(1, device):
                if processes > 1:
                    self._fine_tune_in_processes(missing, processes)
                else:
                    for task in tqdm(missing, desc=f"{self.name}: fine-tuning", unit="task"):
                        self._fine_tune(task)

    def _processes(self, tasks: int) -> int:
        processes = min(self.fine_tune_processes, tasks, usable_cores())
        if processes > 1 and self.fine_tune_bytes:
            processes = max(1, min(processes, available_ram() // self.fine_tune_bytes))
        return processes

    def _fine_tune_in_processes(self, tasks: Sequence[str], processes: int) -> None:
        """Fine-tune ``tasks`` in ``processes`` worker processes, each task in one. The
        checkpoints are those of one after another (every task seeds its own recipe, on one
        thread); the workers are spawned, not forked, so none inherits torch's thread pools."""
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            futures = [pool.submit(_fine_tune_in_process, self, task) for task in tasks]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), unit="task",
                                   desc=f"{self.name}: fine-tuning ({processes} processes, one thread each)"):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # those not started; the running ones finish (no half-written files)
                raise

    def _fine_tune(self, task: str, progress: bool = True) -> None:
        recipe, data = self.recipe, self.data(task)
        torch.manual_seed(recipe.seed)
        rng = np.random.default_rng([recipe.seed, _stable_hash(task)])
        encoder = self.build_encoder()
        encoder.load_state_dict(load_file(str(self.root / "pretrained.safetensors")))
        device = self.prepare_device
        encoder.to(device)
        start = time.perf_counter()

        head = self._fit_probe(encoder, data, rng)
        head.requires_grad_(False)
        if recipe.freeze_word_embeddings:
            for name, parameter in encoder.named_parameters():
                if "word_embeddings" in name:
                    parameter.requires_grad_(False)
        parameters = [p for p in encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        warmup = max(1, int(recipe.warmup_fraction * recipe.steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (recipe.steps - s) / max(1, recipe.steps - warmup)))
        )
        encoder.train()
        order = _epochs(rng, len(data.train))
        losses = []
        for _ in tqdm(range(recipe.steps), desc=f"fine-tune {task}", unit="step", leave=False, disable=not progress):
            batch = [data.train[next(order)] for _ in range(recipe.batch_size)]
            inputs = to_device(self.tokenize([text for text, _ in batch]), device)
            labels = torch.tensor([y for _, y in batch]).to(device)
            loss = nn.functional.cross_entropy(head(encoder(**inputs)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())  # read once at the end: no device sync per step
        encoder.eval()
        losses = [float(loss) for loss in losses]
        write_safetensors(self.root / f"{task}.head.safetensors", _on_cpu(head.state_dict()), float32=True)
        write_safetensors(self.root / f"{task}.safetensors", _on_cpu(encoder.state_dict()), float32=True)
        write_json(
            self.root / f"{task}.log.json",
            {"seconds": time.perf_counter() - start, "first_loss": losses[0], "last_losses": losses[-10:]},
        )

    @torch.no_grad()
    def _features(self, encoder: nn.Module, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        encoder.eval()
        device = next(encoder.parameters()).device
        return torch.cat([encoder(**to_device(self.tokenize(texts[i : i + batch_size]), device))
                          for i in range(0, len(texts), batch_size)])

    def _fit_probe(self, encoder: nn.Module, data: TextData, rng: np.random.Generator) -> nn.Linear:
        """Linear probe on frozen pretrained features (full-batch Adam, seeded)."""
        recipe = self.recipe
        picks = rng.choice(len(data.train), size=min(recipe.probe_examples, len(data.train)), replace=False)
        features = self._features(encoder, [data.train[i][0] for i in picks])
        labels = torch.tensor([data.train[i][1] for i in picks]).to(features.device)
        head = nn.Linear(features.shape[1], len(data.classes)).to(features.device)  # initialised on the CPU, as before
        optimizer = torch.optim.Adam(head.parameters(), lr=recipe.probe_learning_rate, weight_decay=1e-4)
        for _ in range(recipe.probe_steps):
            loss = nn.functional.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return head


class TextTaskData(TaskData):
    """The tasks of an offline text suite read through one of its backbones: its cached
    examples, tokenizer and the linear probe each task's fine-tuning kept as its head."""

    def __init__(self, backbone: TextClassificationBackbone):
        self.backbone = backbone

    def classes(self, task: str) -> tuple[str, ...]:
        return self.backbone.data(task).classes

    def head(self, task: str) -> nn.Module:
        self.backbone.check_task(task)
        state = load_file(str(self.backbone.require(self.backbone.root / f"{task}.head.safetensors")))
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        return head

    def split_size(self, task: str, split: str) -> int:
        return len(self.backbone.examples(task, split))

    def batch(self, task: str, split: str, start: int, stop: int) -> Batch:
        chunk = self.backbone.examples(task, split)[start:stop]
        return self.backbone.tokenize([text for text, _ in chunk]), torch.tensor([label for _, label in chunk])

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        examples = self.backbone.examples(task, split)
        if n > len(examples):
            raise ValueError(f"{self.backbone.name}/{task}: {n} exemplars asked, the {split} split has {len(examples)}")
        picks = np.random.default_rng([seed, _stable_hash(task)]).choice(len(examples), size=n, replace=False)
        return self.backbone.tokenize([examples[i][0] for i in sorted(picks)])


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's tensors on the CPU (the same tensors when they already are)."""
    return {key: value.detach().cpu() for key, value in state.items()}


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _epochs(rng: np.random.Generator, n: int) -> Iterator[int]:
    """Indices of successive seeded shuffles of range(n)."""
    while True:
        yield from rng.permutation(n).tolist()
