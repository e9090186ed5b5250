"""The GLUE tasks of the merging papers and where their data comes from.

Tasks, fields and metrics follow EMR-Merging (Huang et al., NeurIPS 2024) and T-Switch
(Qi et al., CVPR 2025), which take them from DARE's ``glue_data_loader.py``: CoLA
(Matthews correlation), SST-2, MRPC, STS-B (mean of Pearson and Spearman on the
regression output), QQP, MNLI, QNLI, RTE (accuracy). As in those papers, models are
scored on the GLUE *validation* split (the test labels are hidden); MNLI uses
``validation_matched``. Exemplars are seeded samples of the training split.

Sources, first match wins:

1. ``--data-dir DIR`` (or ``$MERGEBENCH_DATA_DIR``): one folder per task, ``DIR/<task>/``
   with ``<task>`` one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, holding either

   * a snapshot of the hub dataset: ``train-*.parquet`` and ``validation-*.parquet``
     (MNLI: ``validation_matched-*.parquet``), i.e. what
     ``huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir DIR`` writes;
   * a ``datasets`` ``save_to_disk`` folder of the task's DatasetDict
     (``load_dataset("nyu-mll/glue", task).save_to_disk(DIR/task)``);
   * or files ``train.{parquet,csv,tsv,json,jsonl}`` and ``validation.<same>`` (MNLI:
     ``validation_matched.<ext>``) with a header row and the hub's column names
     (e.g. ``sentence1``, ``sentence2``, ``label``), integer labels in the hub's order
     (float scores for STS-B); TSV is read without quote handling, as GLUE's own files need.

2. Otherwise the hub dataset ``nyu-mll/glue`` (its parquet files, fetched once into the
   Hugging Face cache by ``mergebench prepare``).

``datasets`` is an optional dependency (``pip install "mergebench[glue]"``).
"""
from __future__ import annotations

import csv
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from mergebench.errors import MergebenchError, MissingResourceError
from mergebench.task import Task
from mergebench.cache import cache_dir
from mergebench.tasks._hub import snapshot

HUB_DATASET = "nyu-mll/glue"
SPLITS = {"train": "train", "test": "validation"}  # mergebench split -> GLUE split (test labels are hidden)
_FORMATS = {".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
            ".json": ("json", {}), ".jsonl": ("json", {})}


class GlueDataError(MergebenchError, ValueError):
    """GLUE files that are present but do not have the expected columns or labels."""


class MissingGlueResource(MissingResourceError):
    """A missing GLUE dataset or checkpoint: what it is, why it is missing ("is ...") and
    how to provide it, kept apart so that one error can name every missing one with a
    reason and hint they share said once."""

    def __init__(self, what: str, why: str, hint: str = ""):
        super().__init__(f"{what} {why}" + (f". {hint}" if hint else ""))
        self.what, self.why, self.hint = what, why, hint


T = TypeVar("T")


def collect_missing(missing: list[MissingResourceError], find: Callable[..., T], *args: Any) -> T | None:
    """``find(*args)``, or None with its MissingResourceError added to ``missing``, so that
    a user learns everything missing at once rather than one item per attempt."""
    try:
        return find(*args)
    except MissingResourceError as error:
        missing.append(error)
        return None


def all_missing(name: str, missing: list[MissingResourceError]) -> MissingResourceError:
    """One error naming every missing item; items with the same reason and hint share a line."""
    plain: list[str] = []  # errors with a message of their own
    groups: dict[tuple[str, str], list[str]] = {}  # (why, hint) -> what
    for error in missing:
        if isinstance(error, MissingGlueResource):
            whats = groups.setdefault((error.why, error.hint), [])
            if error.what not in whats:
                whats.append(error.what)
        elif str(error) not in plain:
            plain.append(str(error))
    count = len(plain) + sum(map(len, groups.values()))
    if count == 1:
        return missing[0]
    lines = plain + [f"{'; '.join(whats)}: {why.removeprefix('is ')}" + (f". {hint}" if hint else "")
                     for (why, hint), whats in groups.items()]
    return MissingResourceError(f"{name}: {count} datasets or checkpoints are missing:\n"
                                + "\n".join(f"  - {line}" for line in lines))


def hub_snapshot(repo_id: str, *, what: str, hint: str, **options: Any) -> Path:
    """``_hub.snapshot``; its failure a MissingGlueResource with the reason and hint kept apart."""
    try:
        return snapshot(repo_id, what=what, local_hint=hint, **options)
    except MissingResourceError as error:
        why = str(error).removeprefix(what).removesuffix(hint).strip().rstrip(".")
        raise MissingGlueResource(what, why, hint) from error


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its hub configuration name, text fields, labels and metric."""

    name: str
    text_columns: tuple[str, ...]
    classes: tuple[str, ...]
    metric: str = "accuracy"
    regression: bool = False
    validation_split: str = "validation"

    @property
    def task(self) -> Task:
        """The task as the glue suite declares it."""
        return Task(self.name, self.classes, self.metric, outputs="regression" if self.regression else "class-logits")

    def split_name(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return self.validation_split if SPLITS[split] == "validation" else "train"


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), metric="matthews"),
        GlueTask("sst2", ("sentence",), ("negative", "positive")),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
        GlueTask("stsb", ("sentence1", "sentence2"), ("similarity",), metric="pearson_spearman", regression=True),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
        GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 validation_split="validation_matched"),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    )
}


def glue_task(name: str) -> GlueTask:
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown GLUE task {name!r}; valid: {', '.join(GLUE_TASKS)}") from None


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise MissingResourceError(
            'the GLUE suite reads its data with the `datasets` package: pip install "mergebench[glue]"'
        ) from error
    datasets.disable_progress_bars()  # one bar per split would drown the run's own bars
    return datasets


def _split_files(folder: Path, split: str) -> list[Path]:
    """Files of one split in a task folder: ``<split>-*.<ext>`` (hub shards) or ``<split>.<ext>``."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix in _FORMATS and (p.stem == split or fnmatch.fnmatch(p.name, f"{split}-*"))
    )


class GlueData:
    """Train and validation splits of the GLUE tasks, loaded lazily (memory-mapped Arrow)."""

    def __init__(self, data_dir: Path | str | None = None):
        self.data_dir = Path(data_dir) if data_dir else None
        self._splits: dict[str, dict[str, Any]] = {}

    def source(self) -> str:
        return str(self.data_dir.resolve()) if self.data_dir else f"hub:{HUB_DATASET}"

    def split(self, task: str, split: str):
        """The ``datasets.Dataset`` of a mergebench split ("train" or "test" = GLUE validation)."""
        spec = glue_task(task)
        return self.load(task)[spec.split_name(split)]

    def load(self, task: str) -> dict[str, Any]:
        """{"train": Dataset, <validation split>: Dataset} of a task, checked."""
        if task not in self._splits:
            spec = glue_task(task)
            folder = self._folder(spec)
            splits = self._read(spec, folder)
            for name, dataset in splits.items():
                _check(spec, folder, name, dataset)
            self._splits[task] = splits
        return self._splits[task]

    # --- where the files are ----------------------------------------------------------
    def _folder(self, spec: GlueTask) -> Path:
        wanted = ("train", spec.validation_split)
        if self.data_dir is not None:
            if not self.data_dir.is_dir():
                raise MissingResourceError(f"--data-dir {self.data_dir} does not exist")
            folder = self.data_dir / spec.name
            if not folder.is_dir():
                raise MissingGlueResource(
                    f"the GLUE {spec.name} folder {folder}", "is missing",
                    f"The data directory needs one folder per task ({', '.join(GLUE_TASKS)}) holding its train "
                    "and validation splits (validation_matched for mnli): hub parquet files, a save_to_disk folder, "
                    "or train/validation .csv/.tsv/.json files; e.g. `huggingface-cli download "
                    f"{HUB_DATASET} --repo-type dataset --local-dir {self.data_dir}`",
                )
            return folder

        def select(files: list[str]) -> list[str] | None:
            chosen = [f for f in files for s in wanted if fnmatch.fnmatch(f, f"{spec.name}/{s}-*.parquet")]
            found = {s for s in wanted if any(fnmatch.fnmatch(f, f"{spec.name}/{s}-*.parquet") for f in chosen)}
            return chosen if found == set(wanted) else None

        root = hub_snapshot(
            HUB_DATASET, repo_type="dataset", select=select, what=f"the GLUE {spec.name} dataset",
            hint=(
                f"Download it where there is network (`huggingface-cli download {HUB_DATASET} --repo-type dataset "
                "--local-dir DIR`, or add --include '<task>/*' for one task), copy DIR here and pass --data-dir DIR "
                "(or set $MERGEBENCH_DATA_DIR)."
            ),
        )
        return root / spec.name

    def _read(self, spec: GlueTask, folder: Path) -> dict[str, Any]:
        datasets = _import_datasets()
        wanted = ("train", spec.validation_split)
        if (folder / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
            missing = [s for s in wanted if s not in loaded]
            if missing:
                raise GlueDataError(f"{folder}: the saved DatasetDict has splits {list(loaded)}, not {missing}")
            return {s: loaded[s] for s in wanted}
        files = {s: _split_files(folder, s) for s in wanted}
        missing = [s for s, paths in files.items() if not paths]
        if missing:
            raise MissingResourceError(
                f"GLUE {spec.name}: no {' or '.join(missing)} split in {folder} (expected files named "
                f"{missing[0]}-*.parquet or {missing[0]}.<parquet|csv|tsv|json|jsonl>, or a save_to_disk folder)"
            )
        suffixes = {p.suffix for paths in files.values() for p in paths}
        if len(suffixes) != 1:
            raise GlueDataError(f"{folder}: the split files mix formats {sorted(suffixes)}; use one")
        builder, options = _FORMATS[suffixes.pop()]
        splits = {}
        for split, paths in files.items():  # one by one: the splits may differ in columns
            try:
                splits[split] = datasets.load_dataset(
                    builder, data_files={split: [str(p) for p in paths]}, split=split,
                    cache_dir=str(cache_dir() / "datasets"), **options,
                )
            except Exception as error:  # the builders raise many types (ArrowInvalid, ParserError, ...)
                cause = f" ({error.__cause__})" if error.__cause__ else ""
                raise GlueDataError(f"cannot read {', '.join(map(str, paths))}: {error}{cause}") from error
        return splits


def _check(spec: GlueTask, folder: Path, split: str, dataset) -> None:
    """The columns are there and the labels are those of the task (not the hidden test labels)."""
    where = f"GLUE {spec.name} {split} split in {folder}"
    missing = [c for c in (*spec.text_columns, "label") if c not in dataset.column_names]
    if missing:
        raise GlueDataError(f"{where}: no column {', '.join(missing)} (columns: {', '.join(dataset.column_names)})")
    feature = dataset.features["label"]
    names = getattr(feature, "names", None)
    if names is not None and tuple(names) != spec.classes:
        raise GlueDataError(f"{where}: label names {names} differ from {list(spec.classes)}")
    if not len(dataset):
        raise GlueDataError(f"{where}: no examples")
    labels = np.asarray(dataset["label"])
    if spec.regression:
        if not np.issubdtype(labels.dtype, np.number) or not np.isfinite(labels).all():
            raise GlueDataError(f"{where}: scores must be finite numbers")
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise GlueDataError(f"{where}: labels must be integers 0..{len(spec.classes) - 1}, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= len(spec.classes):
        hint = " (-1 marks hidden test labels: is this the test split?)" if labels.min() < 0 else ""
        raise GlueDataError(
            f"{where}: labels range {labels.min()}..{labels.max()}, expected 0..{len(spec.classes) - 1}{hint}"
        )
