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
outputs; integer labels in range, or names of the head's ``id2label``). ``mergebench
prepare`` then converts the checkpoints once into safetensors under
``$MERGEBENCH_CACHE/<name>/<fingerprint of the file>/`` with the prepare manifest, as the
built-in suites do (``--force`` converts again after the checkpoints changed).
"""
from __future__ import annotations

import functools
import hashlib
import json
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mergebench.cache import cache_dir, write_json, write_safetensors
from mergebench.errors import CheckpointError, MissingResourceError
from mergebench.registry import register_backbone, register_suite, register_suite_kind
from mergebench.suite import Suite
from mergebench.suite_config import Source, SuiteConfig, TaskConfig, export_metadata
from mergebench.task import Batch, Task, TaskData
from mergebench.tasks._hub import list_files, snapshot
from mergebench.tasks._prepared import PreparedBackbone, check_like_pretrained
from mergebench.tasks._text_classification import _stable_hash

CONVERSION_VERSION = 1
CLASSIFIER_NAMES = ("classifier", "score")
WEIGHTS = (".safetensors", ".bin")
DATA_FORMATS = {".csv": "csv", ".jsonl": "json lines", ".json": "json lines", ".parquet": "parquet"}


# --- files -------------------------------------------------------------------------------------------
def checkpoint_folder(source: Source, what: str) -> Path:
    """The local folder of a checkpoint: the path itself, or the Hub snapshot of its id
    (from the hub cache, fetched only when the hub answers)."""
    if source.path is not None:
        if not (source.path / "config.json").is_file():
            raise CheckpointError(f"{source.path} holds no Hugging Face model: config.json is missing ({what})")
        return source.path

    def select(files: list[str]) -> list[str] | None:
        top = [f for f in files if "/" not in f]
        weights = [f for f in top if f.endswith(WEIGHTS)]
        safetensors = [f for f in weights if f.endswith(".safetensors")]
        if "config.json" not in top or not weights:
            return None
        return [f for f in top if not f.endswith(WEIGHTS)] + (safetensors or weights)

    hint = (f"Download it where there is network (`huggingface-cli download {source.value} --local-dir DIR`), "
            "copy DIR here and write its path in the suite file (starting with ./ or /).")
    return snapshot(source.value, select=select, what=what, local_hint=hint)


def read_model_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


@functools.lru_cache(maxsize=64)
def read_split(task: TaskConfig, split: str):
    """One split of a task as a pandas DataFrame (local file, or the Hub dataset's files of the split)."""
    import pandas as pd

    value = getattr(task, split)
    if task.dataset is not None:
        config = task.dataset_config

        def select(files: list[str]) -> list[str] | None:
            def of_split(file: str) -> bool:  # <split>-00000-of-00001.parquet, <split>.csv or <split>/...
                path = Path(file)
                return path.name.startswith(f"{value}-") or path.stem == value or path.parent.name == value

            picked = [f for f in files if Path(f).suffix in DATA_FORMATS and of_split(f)
                      and (config is None or f.split("/")[0] == config)]
            return picked or None

        hint = (f"Download it where there is network (`huggingface-cli download --repo-type dataset {task.dataset} "
                "--local-dir DIR`) and name its split files in the suite file as train and test paths instead.")
        root = snapshot(task.dataset, repo_type="dataset", select=select,
                        what=f"the {split} split {value!r} of dataset {task.dataset!r}", local_hint=hint)
        files = [root / f for f in (select(list_files(root)) or [])]
    else:
        files = [value.path]
    frames = []
    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix == ".csv":
                frames.append(pd.read_csv(path))
            elif suffix in (".jsonl", ".json"):
                frames.append(pd.read_json(path, lines=True))
            elif suffix == ".parquet":
                frames.append(pd.read_parquet(path))
            else:
                raise CheckpointError(f"{path}: unknown data format {suffix!r}; valid: {', '.join(DATA_FORMATS)}")
        except (ValueError, OSError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise MissingResourceError(f"{path}: cannot read it as {DATA_FORMATS.get(suffix, suffix)} ({error})") from None
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# --- modules -----------------------------------------------------------------------------------------
def classifier_name(model: nn.Module) -> str:
    for name in CLASSIFIER_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise CheckpointError(f"{type(model).__name__} has no classifier module ({' or '.join(CLASSIFIER_NAMES)})")


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


@contextmanager
def quiet_transformers():
    """transformers' warnings about the classifier it initialises and then discards."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


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
class SuiteFileBackbone(PreparedBackbone):
    """The checkpoints of one suite file, converted once (``prepare``) into the encoder and
    head safetensors, the encoder config and the tokenizer under ``root``."""

    config: ClassVar[SuiteConfig]
    prepare_hint = "(with the same --suite-config)"

    def __init__(self, checkpoint_dir: Path | str | None = None, data_dir: Path | str | None = None,
                 root: Path | str | None = None):
        super().__init__(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
        key = json.dumps({"version": CONVERSION_VERSION, "file": self.config.fingerprint})
        self.root = Path(root) if root is not None else cache_dir() / self.name / hashlib.sha256(key.encode()).hexdigest()[:12]

    @classmethod
    def export_metadata(cls) -> dict[str, Any]:
        return export_metadata(cls.config)

    def task_config(self, task: str) -> TaskConfig:
        self.check_task(task)
        return next(t for t in self.config.tasks if t.name == task)

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
        return frame, label_indices(config, frame[config.label], class_names(config))

    def tokenize(self, task: str, rows) -> dict[str, torch.Tensor]:
        config = self.backbone.task_config(task)
        texts = [["" if t is None else str(t) for t in rows[column].tolist()] for column in config.text]
        encoded = self.backbone.tokenizer(*texts, padding=True, truncation=True,
                                          max_length=self.backbone.config.max_length, return_tensors="pt")
        return {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}


# --- checks and registration -------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def class_names(task: TaskConfig) -> tuple[str, ...]:
    """The head's classes, in output order (its config's id2label)."""
    config = read_model_config(checkpoint_folder(task.checkpoint, f"the checkpoint of task {task.name!r}"))
    labels = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}
    return tuple(labels[str(i)] if str(i) in labels else labels[i] for i in range(len(labels)))


def label_indices(task: TaskConfig, column, classes: tuple[str, ...]) -> np.ndarray:
    """The labels of a column as the head's output indices (integers as they are, names through id2label)."""
    values = column.to_numpy()
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(str(value), -1) for value in values], dtype=np.int64)


def check(config: SuiteConfig) -> dict[str, tuple[str, ...]]:
    """What the files hold, before any work: one architecture, sequence classifiers, columns
    and labels that fit each head. The classes of each task."""
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
        architectures = model.get("architectures") or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise config.error(f"{task.checkpoint.describe()} is {', '.join(architectures) or 'no named architecture'}, "
                               "not a *ForSequenceClassification", f"{key}.checkpoint")
        names = class_names(task)
        if len(names) < 2:
            raise config.error(f"{task.checkpoint.describe()} has a head of {len(names)} output: regression heads "
                               "are not supported", f"{key}.checkpoint")
        for split in ("train", "test"):
            frame = read_split(task, split)
            where = getattr(task, split)
            where = where.describe() if isinstance(where, Source) else f"split {where!r} of {task.dataset}"
            for column, option in [*((c, "text") for c in task.text), (task.label, "label")]:
                if column not in frame.columns:
                    raise config.error(f"column {column!r} is not in {where}; its columns: "
                                       f"{', '.join(map(str, frame.columns))}", f"{key}.{option}")
            if len(frame) == 0:
                raise config.error(f"{where} has no rows", f"{key}.{split}")
            labels = label_indices(task, frame[task.label], names)
            bad = frame[task.label][(labels < 0) | (labels >= len(names))]
            if len(bad):
                raise config.error(f"label {bad.iloc[0]!r} in {where} does not fit the head of "
                                   f"{task.checkpoint.describe()}: {len(names)} outputs, classes {', '.join(names)}",
                                   f"{key}.label")
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
    tasks = [Task(task.name, classes[task.name], metric=task.metric) for task in config.tasks]
    register_suite(Suite(config.name, tasks, SuiteFileTaskData,
                         description=config.description or f"from {config.path}"))
    backbone = type(f"SuiteFile_{config.name.replace('-', '_')}", (SuiteFileBackbone,), {
        "name": config.name, "suite": config.name, "config": config,
        "task_names": tuple(task.name for task in config.tasks),
        "description": config.description or f"suite file {config.path}",
    })
    register_backbone(config.name)(backbone)
