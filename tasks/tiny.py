"""The ``tiny`` suite: a 2-layer BERT with random "pretrained" weights and three
synthetic token-marker tasks. It prepares in seconds and exists so that the whole
pipeline (fine-tuning, merging, evaluation, records) can be exercised by tests and
smoke runs; its numbers mean nothing about real models.

Each task has its own marker tokens; an example is filler tokens with exactly one
marker, whose identity is the label.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergebench.registry import register_backbone, register_suite
from mergebench.suite import Suite
from mergebench.task import Task
from mergebench.tasks._text_classification import FineTuneRecipe, TextClassificationBackbone, TextData, TextTaskData

FILLER = 40  # tokens w0..w39
TASKS = {"markers-a": ("a0", "a1", "a2"), "markers-b": ("b0", "b1", "b2"), "markers-c": ("c0", "c1")}
VOCAB = ["[PAD]", "[CLS]", *(f"w{i}" for i in range(FILLER)), *(m for ms in TASKS.values() for m in ms)]
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}

register_suite(Suite("tiny", [Task(name, markers) for name, markers in TASKS.items()], TextTaskData,
                     description="3 synthetic token-marker tasks (smoke tests; their numbers mean nothing)"))


@register_backbone("tiny-bert")
class TinyBert(TextClassificationBackbone):
    name = "tiny-bert"
    suite = "tiny"
    description = "2-layer random BERT on 3 synthetic marker tasks (smoke tests; prepares in seconds)"
    recipe = FineTuneRecipe(steps=40, batch_size=16, learning_rate=3e-3, probe_examples=128, probe_steps=50,
                            freeze_word_embeddings=False)
    length = 8
    rebuilds_checkpoints = True  # fine-tuned here, seeded: one task at a time
    task_names = tuple(TASKS)

    def build_data(self, task: str) -> TextData:
        markers = TASKS[task]
        rng = np.random.default_rng(sorted(TASKS).index(task))

        def examples(n):
            labels = rng.integers(len(markers), size=n)
            tokens = rng.integers(FILLER, size=(n, self.length - 1))
            slots = rng.integers(self.length, size=n)
            return tuple(
                (" ".join(np.insert(np.char.add("w", t.astype(str)), s, markers[y]).tolist()), int(y))
                for t, s, y in zip(tokens, slots, labels)
            )

        return TextData(markers, examples(256), examples(96))

    def new_model(self):
        from transformers import BertConfig, BertModel

        torch.manual_seed(1234)  # the same random "pretrained" weights every time
        config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16)
        return BertModel(config, add_pooling_layer=False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [[TOKEN_IDS["[CLS]"], *(TOKEN_IDS[t] for t in text.split())] for text in texts]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
