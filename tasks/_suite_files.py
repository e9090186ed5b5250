"""What the suite-file kinds share (``tasks/suite_files*.py``): finding a checkpoint folder
(local, or the Hub snapshot of an id), reading a task's data files, a head's classes from
its ``id2label``, and the backbone base whose converted files live under
``$MERGEBENCH_CACHE/<name>/<fingerprint of the file>/``."""
from __future__ import annotations

import functools
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from mergebench.cache import cache_dir
from mergebench.errors import CheckpointError, MissingResourceError
from mergebench.suite_config import Source, SuiteConfig, TaskConfig, export_metadata
from mergebench.tasks._hub import list_files, snapshot
from mergebench.tasks._prepared import PreparedBackbone

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


SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "max_position_embeddings", "image_size", "patch_size", "num_channels", "hidden_sizes", "depths", "embed_dim")


def shape_difference(model: dict[str, Any], pretrained: dict[str, Any]) -> str | None:
    """The first config setting that fixes tensor shapes and differs from the pretrained model's
    (a checkpoint of the same family but another size would pair the wrong tensors), or None."""
    for key in SHAPE_KEYS:
        if key in model and key in pretrained and model[key] != pretrained[key]:
            return f"{key} {model[key]!r}, the pretrained model {pretrained[key]!r}"
    return None


def split_files(task: TaskConfig, split: str) -> list[Path]:
    """The data files of one split of a task: its local file, or the Hub dataset's files of the split."""
    value = getattr(task, split)
    if task.dataset is None:
        return [value.path]
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
    return [root / f for f in (select(list_files(root)) or [])]


@functools.lru_cache(maxsize=64)
def read_split(task: TaskConfig, split: str):
    """One split of a task as a pandas DataFrame (local file, or the Hub dataset's files of the split)."""
    import pandas as pd

    files = split_files(task, split)
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


# --- the backbone ------------------------------------------------------------------------------------
class SuiteFileBase(PreparedBackbone):
    """The checkpoints of one suite file (``config``, set by the kind's builder), converted
    once by ``prepare`` into files under ``root``."""

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


# --- labels --------------------------------------------------------------------------------------------
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
