"""Suites from suite files (``mergebench.suite_config``) of kind ``text-classification``:
a pretrained transformer and one fine-tuned transformers sequence classifier per task
(``AutoModelForSequenceClassification``: BERT, RoBERTa and the other families whose
classifier module is ``classifier`` or ``score``), each task's data in local
CSV / JSON lines / parquet files or a Hub dataset.

Everything but the classifier is merged, as in DARE's MergeLM (which EMR-Merging and
T-Switch build on: ``exclude_param_names_regex=[".*classifier.*"]``); each task keeps its
fine-tuned classifier as its head. The encoder is the sequence classifier with its
classifier replaced by the identity, so its output is exactly what the classifier reads:
BERT's pooled [CLS] state, or for classifiers that read the hidden states themselves
(RoBERTa's ``RobertaClassificationHead``) the first token's hidden state, which the head
is then given as a sequence of one token.

Checked when the file is registered, before any work: every checkpoint's ``config.json``
(one ``model_type`` for all, a ``*ForSequenceClassification`` per task), every dataset's
columns, and each task's labels against its head (as many distinct labels as the head has
outputs; integer labels in range, or names of the head's ``id2label``). A head of one output
(``num_labels = 1``, transformers' regression ``problem_type``, as STS-B's) is a regression
task: its labels are numbers and its metric the mean of Pearson's and Spearman's
correlations, as the merging papers report STS-B (``pearson_spearman``). ``mergebench
prepare`` then converts the checkpoints once into safetensors under
``$MERGEBENCH_CACHE/<name>/<fingerprint of the file>/`` with the prepare manifest, as the
built-in suites do (``--force`` converts again after the checkpoints changed).
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mergebench.cache import write_json, write_safetensors
from mergebench.errors import CheckpointError
from mergebench.registry import register_backbone, register_suite, register_suite_kind
from mergebench.suite import Suite
from mergebench.suite_config import Source, SuiteConfig, TaskConfig
from mergebench.task import Batch, Task, TaskData
from mergebench.tasks._prepared import check_like_pretrained
from mergebench.tasks._suite_files import (SuiteFileBase, checkpoint_folder, class_names, classifier_name,
                                           label_indices, quiet_transformers, read_model_config, read_split,
                                           shape_difference)
from mergebench.tasks._text_classification import _stable_hash


# --- modules -----------------------------------------------------------------------------------------
class SequenceClassifierBody(nn.Module):
    """A transformers sequence classifier whose classifier is the identity: the features are
    what its classifier reads (the first token's state where the classifier reads the sequence)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(model, classifier_name(model), nn.Identity())
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        return output[:, 0] if output.dim() == 3 else output


def _as_sequence(module: nn.Module, args: tuple) -> tuple:
    return (args[0].unsqueeze(1),)  # (batch, hidden) -> (batch, 1, hidden): the first token's state


def read_classifier(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """(encoder state, classifier state, config) of a fine-tuned sequence classifier folder."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), output_loading_info=True, local_files_only=True)
    name = classifier_name(model)
    if info["missing_keys"]:
        raise CheckpointError(f"{folder}: not a fine-tuned sequence classifier, missing {sorted(info['missing_keys'])[:5]}")
    head = {key: value.detach().clone() for key, value in getattr(model, name).state_dict().items()}
    encoder = SequenceClassifierBody(model)
    return {key: value.detach() for key, value in encoder.state_dict().items()}, head, model.config


# --- the backbone ------------------------------------------------------------------------------------
class SuiteFileBackbone(SuiteFileBase):
    """The checkpoints of a text-classification suite file, converted once (``prepare``) into
    the encoder and head safetensors, the encoder config and the tokenizer under ``root``."""

    # --- the encoder and its tokenizer ------------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(str(self.require(self.root / "config.json").parent), local_files_only=True)
        with quiet_transformers():
            return SequenceClassifierBody(AutoModelForSequenceClassification.from_config(config))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.require(self.root / "tokenizer")), local_files_only=True)

    @cached_property
    def reads_sequence(self) -> bool:
        """Whether the classifiers read the hidden states themselves (then given the first token's)."""
        return bool(json.loads(self.require(self.root / "encoder.json").read_text())["reads_sequence"])

    # --- preparation --------------------------------------------------------------------------------
    def prepare(self, force: bool = False) -> None:
        """Convert what is missing: the pretrained encoder (with config and tokenizer) and each
        task's encoder and classifier, every one checked against the pretrained encoder."""
        from transformers import AutoTokenizer

        base = ("pretrained.safetensors", "config.json", "encoder.json", "tokenizer")
        if force or not all((self.root / name).exists() for name in base):
            folder = checkpoint_folder(self.config.pretrained, f"the pretrained model of suite {self.name!r}")
            tokenizer_folder = folder if (folder / "tokenizer_config.json").exists() else checkpoint_folder(
                self.config.tasks[0].checkpoint, "a tokenizer")
            state, config = self._read_pretrained(folder)
            self.root.mkdir(parents=True, exist_ok=True)
            AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True).save_pretrained(
                str(self.root / "tokenizer"))
            config.save_pretrained(str(self.root))
            encoder = self.build_encoder()
            encoder.load_state_dict(state, strict=True)
            with torch.no_grad():
                ids = torch.ones(1, 2, dtype=torch.long)
                output = encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            write_json(self.root / "encoder.json", {"reads_sequence": output.dim() == 3})
            write_safetensors(self.root / "pretrained.safetensors", state, float32=True)
        reference = load_file(str(self.root / "pretrained.safetensors"))
        for task in self.config.tasks:
            if force or not all((self.root / f"{task.name}{s}").exists() for s in (".safetensors", ".head.safetensors")):
                self._convert(task, reference)

    def _read_pretrained(self, folder: Path):
        from transformers import AutoModelForSequenceClassification

        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder), output_loading_info=True, local_files_only=True)
        name = classifier_name(model)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(f"{name}."))
        if missing:
            raise CheckpointError(f"{folder}: the pretrained model lacks {missing[:5]} (pretrained: {self.config.path})")
        encoder = SequenceClassifierBody(model)
        return {key: value.detach() for key, value in encoder.state_dict().items()}, model.config

    def _convert(self, task: TaskConfig, reference: dict[str, torch.Tensor]) -> None:
        folder = checkpoint_folder(task.checkpoint, f"the checkpoint of task {task.name!r}")
        encoder, head, config = read_classifier(folder)
        check_like_pretrained(folder, encoder, reference)
        config.save_pretrained(str(self.root / f"{task.name}.config"))
        write_safetensors(self.root / f"{task.name}.head.safetensors", head, float32=True)
        write_safetensors(self.root / f"{task.name}.safetensors", encoder, float32=True)


class SuiteFileTaskData(TaskData):
    """A suite file's tasks read through its backbone: the data files tokenised by its
    tokenizer, labels mapped to the head's indices, each head its fine-tuned classifier."""

    def __init__(self, backbone: SuiteFileBackbone):
        self.backbone = backbone

    def head(self, task: str) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        backbone = self.backbone
        backbone.check_task(task)
        state = load_file(str(backbone.require(backbone.root / f"{task}.head.safetensors")))
        config = AutoConfig.from_pretrained(str(backbone.require(backbone.root / f"{task}.config")), local_files_only=True)
        with quiet_transformers(), torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        head = getattr(model, classifier_name(model))
        head.load_state_dict(state, strict=True, assign=True)
        if backbone.reads_sequence:
            head.register_forward_pre_hook(_as_sequence)
        return head

    def batches(self, task: str, split: str, batch_size: int) -> Iterator[Batch]:
        frame, labels = self.split(task, split)
        for start in range(0, len(frame), batch_size):
            yield self.tokenize(task, frame.iloc[start:start + batch_size]), torch.from_numpy(labels[start:start + batch_size])

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        frame, _ = self.split(task, split)
        if n > len(frame):
            raise ValueError(f"{self.backbone.name}/{task}: {n} exemplars asked, the {split} split has {len(frame)}")
        picks = np.random.default_rng([seed, _stable_hash(task)]).choice(len(frame), size=n, replace=False)
        return self.tokenize(task, frame.iloc[sorted(picks.tolist())])

    def split(self, task: str, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid: train, test")
        config = self.backbone.task_config(task)
        frame = read_split(config, split)
        if is_regression(config):
            return frame, frame[config.label].to_numpy(dtype=np.float32)
        return frame, label_indices(config, frame[config.label], class_names(config))

    def tokenize(self, task: str, rows) -> dict[str, torch.Tensor]:
        config = self.backbone.task_config(task)
        texts = [["" if t is None else str(t) for t in rows[column].tolist()] for column in config.text]
        encoded = self.backbone.tokenizer(*texts, padding=True, truncation=True,
                                          max_length=self.backbone.config.max_length, return_tensors="pt")
        return {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}


# --- checks and registration -------------------------------------------------------------------------
def is_regression(task: TaskConfig) -> bool:
    """A head of one output: transformers' regression ``problem_type`` (its loss is the mean squared error)."""
    return len(class_names(task)) == 1


def metric_of(task: TaskConfig) -> str:
    return task.metric or ("pearson_spearman" if is_regression(task) else "accuracy")


def check_regression(config: SuiteConfig, task: TaskConfig) -> None:
    """A regression task's metric is a correlation and its labels finite numbers."""
    import pandas as pd

    key = f"tasks.{task.name}"
    if metric_of(task) != "pearson_spearman":
        raise config.error(f"{task.checkpoint.describe()} has a regression head (one output): its metric is "
                           f"pearson_spearman, not {task.metric!r}", f"{key}.metric")
    for split in ("train", "test"):
        frame = read_split(task, split)
        values = frame[task.label]
        if pd.api.types.is_bool_dtype(values):
            numbers = np.full(len(values), np.nan)
        else:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(numbers).all():
            bad = values[~np.isfinite(numbers)].iloc[0]
            raise config.error(f"label {bad!r} in {describe_split(task, split)} is not a finite number, which the "
                               f"regression head of {task.checkpoint.describe()} predicts", f"{key}.label")


def describe_split(task: TaskConfig, split: str) -> str:
    where = getattr(task, split)
    return where.describe() if isinstance(where, Source) else f"split {where!r} of {task.dataset}"


def check(config: SuiteConfig) -> dict[str, tuple[str, ...]]:
    """What the files hold, before any work: one architecture, sequence classifiers, columns
    and labels that fit each head. The classes of each task."""
    config.check_keys(required=("text", "label"), unused=("image", "classes", "templates"))
    pretrained = read_model_config(checkpoint_folder(config.pretrained, f"the pretrained model of suite {config.name!r}"))
    model_type = pretrained.get("model_type")
    classes = {}
    for task in config.tasks:
        key = f"tasks.{task.name}"
        model = read_model_config(checkpoint_folder(task.checkpoint, f"the checkpoint of task {task.name!r}"))
        if model.get("model_type") != model_type:
            raise config.error(f"{task.checkpoint.describe()} is a {model.get('model_type')!r} model, the pretrained "
                               f"model {config.pretrained.describe()} a {model_type!r} one: architectures differ",
                               f"{key}.checkpoint")
        if difference := shape_difference(model, pretrained):
            raise config.error(f"{task.checkpoint.describe()} has {difference}: architectures differ", f"{key}.checkpoint")
        architectures = model.get("architectures") or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise config.error(f"{task.checkpoint.describe()} is {', '.join(architectures) or 'no named architecture'}, "
                               "not a *ForSequenceClassification", f"{key}.checkpoint")
        names = class_names(task)
        if not is_regression(task) and task.metric == "pearson_spearman":
            raise config.error(f"{task.checkpoint.describe()} has a classifier of {len(names)} outputs; "
                               "pearson_spearman scores a regression head (num_labels = 1)", f"{key}.metric")
        for split in ("train", "test"):
            frame = read_split(task, split)
            where = describe_split(task, split)
            for column, option in [*((c, "text") for c in task.text), (task.label, "label")]:
                if column not in frame.columns:
                    raise config.error(f"column {column!r} is not in {where}; its columns: "
                                       f"{', '.join(map(str, frame.columns))}", f"{key}.{option}")
            if len(frame) == 0:
                raise config.error(f"{where} has no rows", f"{key}.{split}")
            if is_regression(task):
                continue
            labels = label_indices(task, frame[task.label], names)
            bad = frame[task.label][(labels < 0) | (labels >= len(names))]
            if len(bad):
                raise config.error(f"label {bad.iloc[0]!r} in {where} does not fit the head of "
                                   f"{task.checkpoint.describe()}: {len(names)} outputs, classes {', '.join(names)}",
                                   f"{key}.label")
        if is_regression(task):
            check_regression(config, task)
            classes[task.name] = names
            continue
        seen = np.unique(np.concatenate([label_indices(task, read_split(task, s)[task.label], names)
                                         for s in ("train", "test")]))
        if len(seen) != len(names):
            raise config.error(f"the data has {len(seen)} distinct labels, the head of {task.checkpoint.describe()} "
                               f"has {len(names)} outputs ({', '.join(names)})", f"{key}.label")
        classes[task.name] = names
    return classes


@register_suite_kind("text-classification")
def build(config: SuiteConfig) -> None:
    """Check a text-classification suite file's contents, then register its suite and backbone."""
    classes = check(config)
    tasks = [Task(task.name, classes[task.name], metric=metric_of(task),
                  outputs="regression" if is_regression(task) else "class-logits") for task in config.tasks]
    register_suite(Suite(config.name, tasks, SuiteFileTaskData,
                         description=config.description or f"from {config.path}"))
    backbone = type(f"SuiteFile_{config.name.replace('-', '_')}", (SuiteFileBackbone,), {
        "name": config.name, "suite": config.name, "config": config,
        "task_names": tuple(task.name for task in config.tasks),
        "description": config.description or f"suite file {config.path}",
    })
    register_backbone(config.name)(backbone)
