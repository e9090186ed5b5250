"""Bring your own suite: a TOML file that names a pretrained checkpoint, one fine-tuned
checkpoint per task and each task's dataset, registered as a suite and a backbone of the
same name (``mergebench run --suite-config my-suite.toml``; results in
``results/<name>.jsonl`` like any suite).

The file, checked here before any work (an unknown key, a missing key or folder, a value of
the wrong type: one error naming the key and the file)::

    name = "my-suite"                 # suite and backbone name
    kind = "text-classification"      # what the checkpoints are: text-classification (the default),
                                      # image-classification or clip (``tasks/suite_files*.py``)
    pretrained = "./pretrained"       # a save_pretrained folder, or a Hugging Face Hub id
    description = "..."               # optional
    max_length = 128                  # optional: tokens per input

    [tasks.sentiment]
    checkpoint = "./sentiment"        # the fine-tuned sequence classifier (folder or hub id)
    train = "data/sentiment-train.csv"  # local .csv / .jsonl / .json / .parquet files ...
    test = "data/sentiment-test.jsonl"
    text = "sentence"                 # input column, or two for sentence pairs: ["premise", "hypothesis"]
    label = "label"                   # integers 0..n-1, or the names of the head's id2label
    metric = "accuracy"               # accuracy or matthews (default accuracy); a regression
                                      # head (one output): pearson_spearman, its default

    [tasks.topic]
    checkpoint = "org/bert-topic"
    dataset = "org/topics"            # ... or a Hub dataset, whose split names train and test give
    dataset_config = "default"        # optional
    train = "train"
    test = "validation"
    text = "text"
    label = "label"

    [tasks.pets]                      # in a file of kind image-classification or clip
    checkpoint = "./vit-pets"
    train = "images/train"            # a folder of <class>/*.png|jpg, or a data file / Hub split
    test = "images/test"              # whose image column (bytes or paths) is named by `image`
    classes = ["cat", "dog"]          # optional: the class names (clip), in label order
    templates = ["a photo of a {}."]  # optional (clip): prompt templates, or a vision-8 task's name

Paths are relative to the file. A value that exists as a path, or is written as one
(starting with ``.``, ``/`` or ``~``), is a local folder; anything else is a Hub id, looked
up in the hub cache and fetched only when the hub answers (offline: one clear error). What
the files hold (architectures, columns, label counts) is checked by the suite kind's builder,
registered by a plugin with :func:`mergebench.registry.register_suite_kind`, also before any work.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mergebench.errors import MergebenchError

KEYS = ("name", "kind", "pretrained", "description", "max_length", "tasks")
TASK_KEYS = ("checkpoint", "dataset", "dataset_config", "train", "test", "text", "label", "metric", "image", "classes",
             "templates")
REQUIRED = ("name", "pretrained", "tasks")
TASK_REQUIRED = ("checkpoint", "train", "test")  # a kind requires more (``SuiteConfig.check_keys``)
METRICS = ("accuracy", "matthews", "pearson_spearman")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ENVIRONMENT = "MERGEBENCH_SUITE_CONFIGS"  # the files registered in this process, for the processes it starts


class SuiteConfigError(MergebenchError, ValueError):
    """A suite file that is not what a suite needs; the message names the file and the key."""


@dataclass(frozen=True)
class Source:
    """A checkpoint or dataset: a local path, or a Hugging Face Hub id."""

    value: str
    path: Path | None  # the local path, None for a Hub id

    @property
    def hub_id(self) -> str | None:
        return None if self.path is not None else self.value

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"Hub id {self.value!r}"


@dataclass(frozen=True)
class TaskConfig:
    name: str
    checkpoint: Source
    train: Source | str  # a local file or image folder, or a split name of ``dataset``
    test: Source | str
    text: tuple[str, ...] = ()
    label: str | None = None  # None: an image folder's class folders are the labels
    metric: str | None = None  # None: the kind's default for the head (accuracy, pearson_spearman)
    dataset: str | None = None  # a Hub dataset id (then train and test are split names)
    dataset_config: str | None = None
    image: str | None = None  # the image column of a data file (bytes or paths)
    classes: tuple[str, ...] | None = None  # class names in label order, where a kind reads them from the file
    templates: tuple[str, ...] | str | None = None  # prompt templates, or the name of a known set
    keys: frozenset[str] = frozenset()  # the keys the file wrote for this task


@dataclass(frozen=True)
class SuiteConfig:
    path: Path  # the file, for messages; relative paths were resolved against its folder
    name: str
    kind: str
    pretrained: Source
    tasks: tuple[TaskConfig, ...]
    description: str = ""
    max_length: int = 128
    text: str = field(default="", repr=False)  # the file's content, kept with exported models

    def error(self, message: str, key: str | None = None) -> SuiteConfigError:
        return SuiteConfigError(f"{self.path}: {key + ': ' if key else ''}{message}")

    def check_keys(self, required: tuple[str, ...] = (), unused: tuple[str, ...] = ()) -> None:
        """What a kind needs of every task: each ``required`` key written, no ``unused`` one
        (a key the kind would silently ignore)."""
        for task in self.tasks:
            for key in required:
                if key not in task.keys:
                    raise self.error(f"missing key 'tasks.{task.name}.{key}' (kind {self.kind!r})")
            for key in unused:
                if key in task.keys:
                    raise self.error(f"kind {self.kind!r} does not use key 'tasks.{task.name}.{key}'")

    @property
    def fingerprint(self) -> str:
        """Changes with the file's content and where its relative paths point."""
        key = {"text": self.text, "folder": str(self.path.resolve().parent)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


# --- reading ---------------------------------------------------------------------------------------
def read_config(path: Path | str, text: str | None = None) -> SuiteConfig:
    """The suite file at ``path`` (or ``text`` as if it were there), its keys and local paths checked."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise SuiteConfigError(f"--suite-config {path}: no such file")
        text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SuiteConfigError(f"{path}: not valid TOML ({error})") from None
    where = path.resolve().parent

    def fail(message: str, key: str | None = None) -> SuiteConfigError:
        return SuiteConfigError(f"{path}: {key + ': ' if key else ''}{message}")

    def check_keys(table: Mapping[str, Any], valid: tuple[str, ...], required: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in valid:
                raise fail(f"unknown key {prefix + key!r}; valid keys: {', '.join(valid)}")
        for key in required:
            if key not in table:
                raise fail(f"missing key {prefix + key!r}")

    def string(table: Mapping[str, Any], key: str, label: str) -> str:
        value = table[key]
        if not isinstance(value, str) or not value:
            raise fail(f"expected a non-empty string, got {value!r}", label)
        return value

    def source(value: str, label: str, kind: str) -> Source:
        written_as_path = value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1
        local = (where / Path(value).expanduser()).resolve()
        if local.exists():
            return Source(value, local)
        if written_as_path:
            raise fail(f"{kind} {local} does not exist", label)
        return Source(value, None)

    check_keys(raw, KEYS, REQUIRED, "")
    name = string(raw, "name", "name")
    if not NAME.match(name):
        raise fail(f"{name!r} is not a plain name (letters, digits, '-', '_')", "name")
    kind = string(raw, "kind", "kind") if "kind" in raw else "text-classification"
    max_length = raw.get("max_length", 128)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise fail(f"expected an integer >= 2, got {max_length!r}", "max_length")
    tasks_table = raw["tasks"]
    if not isinstance(tasks_table, dict) or not tasks_table:
        raise fail("no task: add one [tasks.NAME] table per task", "tasks")
    tasks = []
    for task_name, table in tasks_table.items():
        prefix = f"tasks.{task_name}."
        if not isinstance(table, dict):
            raise fail(f"expected a table [tasks.{task_name}], got {table!r}", f"tasks.{task_name}")
        if not NAME.match(task_name):
            raise fail(f"task name {task_name!r} is not a plain name (letters, digits, '-', '_')", f"tasks.{task_name}")
        check_keys(table, TASK_KEYS, TASK_REQUIRED, prefix)
        dataset = string(table, "dataset", prefix + "dataset") if "dataset" in table else None
        if "dataset_config" in table and dataset is None:
            raise fail("dataset_config without dataset", prefix + "dataset_config")
        splits = {}
        for split in ("train", "test"):
            value = string(table, split, prefix + split)
            splits[split] = value if dataset is not None else source(value, prefix + split, "data file or image folder")
            if dataset is None and splits[split].path is None:
                raise fail(f"data file or image folder {where / value} does not exist (a Hub dataset is named by 'dataset', "
                           "with train and test its split names)", prefix + split)
        text_columns = table.get("text", [])
        if isinstance(text_columns, str):
            text_columns = [text_columns]
        if "text" in table and (not isinstance(text_columns, list) or not 1 <= len(text_columns) <= 2
                or not all(isinstance(c, str) and c for c in text_columns)):
            raise fail(f"expected a column name or a list of two, got {table['text']!r}", prefix + "text")
        metric = table.get("metric")
        if metric is not None and metric not in METRICS:
            raise fail(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}", prefix + "metric")
        names = {}
        for key in ("classes", "templates"):
            value = table.get(key)
            if value is None or (key == "templates" and isinstance(value, str) and value):
                names[key] = value
            elif (not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value)
                  or len(set(value)) != len(value)):
                raise fail(f"expected a list of distinct non-empty strings, got {value!r}", prefix + key)
            else:
                names[key] = tuple(value)
        tasks.append(TaskConfig(
            name=task_name,
            checkpoint=source(string(table, "checkpoint", prefix + "checkpoint"), prefix + "checkpoint",
                              "checkpoint folder"),
            train=splits["train"], test=splits["test"], text=tuple(text_columns),
            label=string(table, "label", prefix + "label") if "label" in table else None, metric=metric,
            dataset=dataset,
            dataset_config=string(table, "dataset_config", prefix + "dataset_config") if "dataset_config" in table else None,
            image=string(table, "image", prefix + "image") if "image" in table else None,
            classes=names["classes"], templates=names["templates"], keys=frozenset(table),
        ))
    return SuiteConfig(path=path, name=name, kind=kind,
                       pretrained=source(string(raw, "pretrained", "pretrained"), "pretrained", "checkpoint folder"),
                       tasks=tuple(tasks), description=str(raw.get("description", "")), max_length=max_length,
                       text=text)


# --- registering -----------------------------------------------------------------------------------
_registered: dict[str, str] = {}  # name -> fingerprint of the file registered under it


def register(config: SuiteConfig) -> str:
    """Register the suite and backbone a config describes (its kind's builder checks what
    the files hold); the backbone's name. The same file again is a no-op; another file under
    a name already taken is refused."""
    from mergebench.registry import BACKBONES, SUITE_KINDS, SUITES

    taken = set(BACKBONES.names()) | set(SUITES.names())  # loads the plugins and the files of $MERGEBENCH_SUITE_CONFIGS
    if config.name in _registered:
        if _registered[config.name] != config.fingerprint:
            raise config.error(f"another suite file already registered the name {config.name!r} in this process",
                               "name")
        return config.name
    if config.name in taken:
        raise config.error(f"{config.name!r} is a built-in suite or backbone; choose another name", "name")
    try:
        build = SUITE_KINDS.get(config.kind)
    except KeyError as error:
        raise config.error(str(error).strip("'\""), "kind") from None
    build(config)
    _registered[config.name] = config.fingerprint
    known = [p for p in os.environ.get(ENVIRONMENT, "").split(os.pathsep) if p]
    if str(config.path.resolve()) not in known:  # processes this one starts (sweep workers) register it too
        os.environ[ENVIRONMENT] = os.pathsep.join([*known, str(config.path.resolve())])
    return config.name


def register_suite_config(path: Path | str) -> str:
    """``--suite-config FILE``: the file read, checked and registered; the backbone's name."""
    return register(read_config(path))


def register_embedded(saved: Mapping[str, Any]) -> str:
    """The suite of an exported model (``export_metadata``), registered from the file content it kept."""
    return register(read_config(saved["path"], saved["text"]))


def export_metadata(config: SuiteConfig) -> dict[str, Any]:
    """What an exported model keeps of its suite file, so that ``mergebench.load`` can register it again."""
    return {"suite_config": {"path": str(config.path.resolve()), "text": config.text}}


_environment_loaded = False


def register_from_environment() -> None:
    """Register the suite files a parent process registered (``$MERGEBENCH_SUITE_CONFIGS``)."""
    global _environment_loaded
    if _environment_loaded:
        return
    _environment_loaded = True
    for path in os.environ.get(ENVIRONMENT, "").split(os.pathsep):
        if path and Path(path).is_file():
            register_suite_config(path)
