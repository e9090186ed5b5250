"""Image classification datasets through the ``datasets`` library, found locally or on the hub.

A task's data comes from the first of:

1. ``<data-dir>/<task>/`` written by ``DatasetDict.save_to_disk`` (splits ``train`` and
   ``test``, columns ``image`` and ``label``), read with ``datasets.load_from_disk``;
2. ``<data-dir>/<hub id>/`` (e.g. ``<data-dir>/tanganke/sun397/``) or ``<data-dir>/<task>/``
   holding the dataset repository's parquet files, as ``huggingface-cli download
   tanganke/sun397 --repo-type dataset --local-dir <data-dir>/tanganke/sun397`` leaves them;
3. the Hugging Face hub cache, or the hub itself (the same parquet files, fetched once).

A split's parquet files are those with the split name as a folder name or as the file-name
stem before a "-" (``data/test-00000-of-00001.parquet``, ``cropped_digits/train-...``), read with
``datasets.load_dataset("parquet", ...)``, which needs no network.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergebench.tasks import _hub

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class DatasetSpec:
    task: str
    hub_id: str  # as FusionBench loads it
    config: str | None = None  # a hub repository's sub-folder / configuration (SVHN: cropped_digits)

    def patterns(self, splits: tuple[str, ...]) -> list[str]:
        prefix = f"{self.config}/" if self.config else ""
        return [f"{prefix}*{split}{tail}" for split in splits for tail in ("-*.parquet", ".parquet", "/*.parquet")]


@dataclass(frozen=True)
class DataSource:
    """Where a task's data was found: a ``save_to_disk`` folder or a folder of parquet files."""

    kind: str  # "disk" | "parquet"
    path: Path

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def _split_files(root: Path, split: str, config: str | None) -> list[Path]:
    base = root / config if config and (root / config).is_dir() else root
    pattern = re.compile(rf"(^|/){re.escape(split)}([-.][^/]*)?(/|$)")  # not test_contrast-*: a corrupted variant
    return sorted(p for p in base.rglob("*.parquet") if pattern.search(p.relative_to(base).as_posix()))


def local_source(spec: DatasetSpec, data_dir: Path | None, splits: tuple[str, ...]) -> DataSource | None:
    """The task's data in ``data_dir`` or the hub cache, or None (never the network)."""
    candidates = [data_dir / spec.task, data_dir / spec.hub_id] if data_dir else []
    for folder in candidates:
        if (folder / "dataset_dict.json").is_file():
            return DataSource("disk", folder)
        if folder.is_dir() and all(_split_files(folder, s, spec.config) for s in splits):
            return DataSource("parquet", folder)
    snapshot = _hub.cached_snapshot(spec.hub_id, "dataset", spec.patterns(splits))
    if snapshot is not None and all(_split_files(snapshot, s, spec.config) for s in splits):
        return DataSource("parquet", snapshot)
    return None


def download_source(spec: DatasetSpec, splits: tuple[str, ...]) -> DataSource:
    snapshot = _hub.download_snapshot(spec.hub_id, "dataset", spec.patterns(splits))
    missing = [s for s in splits if not _split_files(snapshot, s, spec.config)]
    if missing:
        raise FileNotFoundError(f"dataset {spec.hub_id}: no parquet files for split(s) {', '.join(missing)} in {snapshot}")
    return DataSource("parquet", snapshot)


def load_split(source: DataSource, spec: DatasetSpec, split: str):
    """One split as a ``datasets.Dataset`` with columns ``image`` (PIL) and ``label`` (int)."""
    import datasets

    if source.kind == "disk":
        loaded = datasets.load_from_disk(str(source.path))
        if split not in loaded:
            raise FileNotFoundError(f"{source.path}: no split {split!r} (splits: {', '.join(loaded)})")
        dataset = loaded[split]
    else:
        files = [str(p) for p in _split_files(source.path, split, spec.config)]
        if not files:
            raise FileNotFoundError(f"{source.path}: no parquet files for split {split!r}")
        dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    image = next((c for c in IMAGE_COLUMNS if c in dataset.column_names), None)
    label = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    if image is None or label is None:
        raise ValueError(
            f"{source.describe()} ({spec.task}/{split}): expected an image column ({'/'.join(IMAGE_COLUMNS)}) "
            f"and a label column ({'/'.join(LABEL_COLUMNS)}); it has {', '.join(dataset.column_names)}"
        )
    dataset = dataset.select_columns([image, label])
    if (image, label) != ("image", "label"):
        dataset = dataset.rename_columns({image: "image", label: "label"})
    if not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def pixel_values(processor: Any, images: list) -> torch.Tensor:
    """The processor's tensors for a list of PIL images (converted to RGB: MNIST is greyscale)."""
    return processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def batch_of(dataset, processor: Any, start: int, stop: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows start..stop-1 of a dataset as (pixel values, labels)."""
    rows = dataset[start:stop]
    return {"pixel_values": pixel_values(processor, rows["image"])}, torch.tensor(rows["label"], dtype=torch.long)


def sample_inputs(dataset, processor: Any, n: int, rng: np.random.Generator, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``n`` distinct rows drawn with ``rng`` (in index order), labels dropped."""
    if n > len(dataset):
        raise ValueError(f"{n} exemplars asked, the split has {len(dataset)} examples")
    picks = sorted(rng.choice(len(dataset), size=n, replace=False).tolist())
    chosen = dataset.select(picks)
    parts = [pixel_values(processor, chosen[i : i + batch_size]["image"]) for i in range(0, n, batch_size)]
    return {"pixel_values": torch.cat(parts) if parts else torch.empty(0)}
