"""Suites from suite files (``mergebench.suite_config``) of the image kinds:

* ``image-classification``: a pretrained transformers image model and one fine-tuned
  ``AutoModelForImageClassification`` per task whose head module is ``classifier`` (ViT,
  ConvNeXt, Swin, BEiT, ResNet, ...). Everything but the classifier is merged and each task
  keeps its fine-tuned classifier as its head, as for the text kind and FusionBench's ConvNeXt
  pool; the encoder is the classifier model with its classifier replaced by the identity, so
  its features are exactly what the classifier reads (ViT's final [CLS] state, ConvNeXt's
  pooled state). Inputs come from the checkpoint's own image processor.
* ``clip``: a pretrained ``CLIPModel`` and one fine-tuned CLIP per task (a ``CLIPModel``,
  ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel`` folder, the last one with the
  pretrained projection, as FusionBench keeps it frozen). The image encoder (vision tower +
  projection) is merged; each task's head is CLIP's zero-shot classifier built from its class
  names with the pretrained text tower and prompt templates (``tasks/_clip.py``), as the
  task-vectors (Ilharco et al. 2023) and T-Switch papers do. Templates: the task's list
  (``{}`` or ``{c}`` marks the class name), the name of a vision-8 task for its set, or the
  CLIP paper's single default ``"a photo of a {}."``.

A task's images: a local folder of class folders (``<class>/*.png|jpg``, torchvision's
``ImageFolder`` and the Hub's ``imagefolder`` layout: class names are the folder names,
sorted), or a data file (parquet / JSON lines / CSV) or Hub dataset split with an image column
(``image``: encoded bytes, the Hub's ``{"bytes", "path"}`` structs, or paths relative to the
file) and a label column (``label``: class indices or names). Class names: the head's
``id2label`` (image-classification: a label name must be one of them), or for ``clip`` the
task's ``classes``, else the class folders, else the ``ClassLabel`` names a Hub parquet file
records, else the sorted distinct label names.

Checked when the file is registered, before any work: the model types and architectures,
the image processor, every image folder and column, and each task's labels against its head
(as many distinct labels as the head has outputs, as for the text kind).
"""
from __future__ import annotations

import functools
import io
import json
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mergebench.cache import write_json, write_safetensors
from mergebench.errors import CheckpointError, CorruptArtifactError
from mergebench.registry import register_backbone, register_suite, register_suite_kind
from mergebench.suite import Suite
from mergebench.suite_config import Source, SuiteConfig, TaskConfig
from mergebench.task import Batch, Task, TaskData
from mergebench.tasks import _clip
from mergebench.tasks._prepared import check_like_pretrained
from mergebench.tasks._suite_files import (SuiteFileBase, checkpoint_folder, class_names, quiet_transformers,
                                           read_model_config, read_split, shape_difference,
                                           split_files)
from mergebench.tasks._text_classification import _stable_hash
from mergebench.tasks._vision8_prompts import TEMPLATES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # CLIP's default prompt (Radford et al. 2021, §3.1.4)
CLIP_VISION_TYPES = ("clip", "clip_vision_model")


# --- images ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSplit:
    """One split's images (paths or encoded bytes) and raw labels (class names or indices)."""

    images: tuple[Any, ...]
    labels: np.ndarray
    where: str  # for messages
    folders: tuple[str, ...] | None = None  # the class folders, for an image folder


def describe_split(task: TaskConfig, split: str) -> str:
    where = getattr(task, split)
    return where.describe() if isinstance(where, Source) else f"split {where!r} of {task.dataset}"


def is_folder(task: TaskConfig, split: str) -> bool:
    where = getattr(task, split)
    return isinstance(where, Source) and where.path is not None and where.path.is_dir()


def folder_split(folder: Path) -> ImageSplit:
    """An image folder: each sub-folder a class, the image files under it (at any depth, sorted,
    as torchvision's ``ImageFolder`` walks them) its examples."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    images, labels = [], []
    for name in classes:
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        images += files
        labels += [name] * len(files)
    return ImageSplit(tuple(images), np.array(labels, dtype=object), str(folder), tuple(classes))


def _image_value(value: Any, base: Path) -> Any:
    """Encoded bytes or an absolute path from an image cell (bytes, {"bytes", "path"} or a path)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    return None


@functools.lru_cache(maxsize=64)
def image_split(task: TaskConfig, split: str) -> ImageSplit:
    """A split's images and labels (an image folder, or a table's image and label columns)."""
    if is_folder(task, split):
        return folder_split(getattr(task, split).path)
    frame = read_split(task, split)
    base = split_files(task, split)[0].parent
    images = tuple(_image_value(value, base) for value in frame[task.image].tolist())
    return ImageSplit(images, frame[task.label].to_numpy(), describe_split(task, split))


def open_image(split: ImageSplit, position: int):
    """Image ``position`` of a split as RGB (greyscale and RGBA files alike); CorruptArtifactError
    naming the file, or the row of the table, if PIL cannot read it."""
    from PIL import Image

    value = split.images[position]
    try:
        with Image.open(io.BytesIO(value) if isinstance(value, bytes) else value) as image:
            return image.convert("RGB")
    except OSError as error:  # PIL's UnidentifiedImageError, a truncated or vanished file
        where = str(value) if isinstance(value, Path) else f"the image of row {position} of {split.where}"
        raise CorruptArtifactError(f"{where}: not an image PIL can read ({error})") from None


def recorded_class_names(task: TaskConfig, split: str) -> tuple[str, ...] | None:
    """The ``ClassLabel`` names a Hub parquet file records for the label column, if any."""
    import pyarrow.parquet as pq

    for path in split_files(task, split):
        if path.suffix != ".parquet":
            continue
        metadata = pq.read_schema(path).metadata or {}
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
        names = features.get(task.label, {}).get("names")
        if names:
            return tuple(map(str, names))
    return None


def load_image_processor(folder: Path):
    """The checkpoint's image processor, PIL-based (no torchvision)."""
    import transformers
    from transformers import AutoImageProcessor

    major = int(transformers.__version__.split(".")[0])
    return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True,
                                              **({"backend": "pil"} if major >= 5 else {"use_fast": False}))


def processor_folder(config: SuiteConfig) -> Path:
    """The first of the pretrained and task checkpoints with an image processor."""
    for source in (config.pretrained, *(task.checkpoint for task in config.tasks)):
        folder = checkpoint_folder(source, "an image processor")
        if (folder / "preprocessor_config.json").is_file():
            return folder
    raise config.error("no checkpoint holds an image processor (preprocessor_config.json), which makes the inputs",
                       "pretrained")


# --- the backbones --------------------------------------------------------------------------------------
class ImageClassifierBody(nn.Module):
    """A transformers image classifier whose classifier is the identity: the features are what
    its classifier reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(getattr(model, "classifier", None), nn.Module):
            raise CheckpointError(f"{type(model).__name__} has no classifier module 'classifier'")
        model.classifier = nn.Identity()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class ImageSuiteBackbone(SuiteFileBase):
    """An image suite file's checkpoints, converted once (``prepare``) under ``root``: the
    encoder states, each task's head, the encoder config and the image processor."""

    @cached_property
    def processor(self):
        return load_image_processor(self.require(self.root / "processor" / "preprocessor_config.json").parent)

    def head_path(self, task: str) -> Path:
        return self.root / f"{task}.head.safetensors"

    def prepare(self, force: bool = False) -> None:
        """Convert what is missing: the pretrained encoder (config, processor) and each task's
        encoder and head, every encoder checked against the pretrained one."""
        base = ("pretrained.safetensors", "encoder.json", "processor/preprocessor_config.json")
        if force or not all((self.root / name).exists() for name in base):
            state = self._convert_pretrained(checkpoint_folder(self.config.pretrained, "the pretrained model"))
            load_image_processor(processor_folder(self.config)).save_pretrained(str(self.root / "processor"))
            write_safetensors(self.root / "pretrained.safetensors", state, float32=True)
        reference = load_file(str(self.root / "pretrained.safetensors"))
        todo = [task for task in self.config.tasks
                if force or not (self.root / f"{task.name}.safetensors").exists() or not self.head_path(task.name).exists()]
        if todo:
            self._convert_tasks(todo, reference)

    def _write_task(self, task: TaskConfig, encoder: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                    reference: dict[str, torch.Tensor], folder: Path) -> None:
        check_like_pretrained(folder, encoder, reference)
        write_safetensors(self.head_path(task.name), head, float32=True)
        write_safetensors(self.root / f"{task.name}.safetensors", encoder, float32=True)


class ImageClassifierBackbone(ImageSuiteBackbone):
    def build_encoder(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(str(self.require(self.root / "encoder.json").parent), local_files_only=True)
        with quiet_transformers():
            return ImageClassifierBody(AutoModelForImageClassification.from_config(config))

    def _convert_pretrained(self, folder: Path) -> dict[str, torch.Tensor]:
        model, missing = _image_classifier(folder)
        missing = [key for key in missing if not key.startswith("classifier.")]
        if missing:
            raise CheckpointError(f"{folder}: the pretrained model lacks {missing[:5]} (pretrained: {self.config.path})")
        model.config.save_pretrained(str(self.root))
        write_json(self.root / "encoder.json", {"config": "config.json"})
        return {key: value.detach() for key, value in ImageClassifierBody(model).state_dict().items()}

    def _convert_tasks(self, tasks: list[TaskConfig], reference: dict[str, torch.Tensor]) -> None:
        for task in tasks:
            folder = checkpoint_folder(task.checkpoint, f"the checkpoint of task {task.name!r}")
            model, missing = _image_classifier(folder)
            if missing:
                raise CheckpointError(f"{folder}: not a fine-tuned image classifier, missing {missing[:5]}")
            model.config.save_pretrained(str(self.root / f"{task.name}.config"))
            head = {key: value.detach().clone() for key, value in model.classifier.state_dict().items()}
            encoder = {key: value.detach() for key, value in ImageClassifierBody(model).state_dict().items()}
            self._write_task(task, encoder, head, reference, folder)


def _image_classifier(folder: Path):
    """(model, missing keys) of an ``AutoModelForImageClassification`` read from a folder."""
    from transformers import AutoModelForImageClassification

    with quiet_transformers():
        model, info = AutoModelForImageClassification.from_pretrained(
            str(folder), output_loading_info=True, local_files_only=True)
    return model.float().eval(), sorted(info["missing_keys"])


class CLIPSuiteBackbone(ImageSuiteBackbone):
    def build_encoder(self) -> nn.Module:
        from transformers import CLIPVisionConfig

        config = json.loads(self.require(self.root / "encoder.json").read_text())
        return _clip.CLIPImageEncoder(CLIPVisionConfig.from_dict(config))

    def _convert_pretrained(self, folder: Path) -> dict[str, torch.Tensor]:
        clip = _clip_model(folder)
        config = clip.config.vision_config
        config.projection_dim = clip.config.projection_dim  # the vision sub-config may carry a stale default
        write_json(self.root / "encoder.json", config.to_dict())
        encoder = self.build_encoder()
        encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
        encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        return {key: value.detach() for key, value in encoder.state_dict().items()}

    def _convert_tasks(self, tasks: list[TaskConfig], reference: dict[str, torch.Tensor]) -> None:
        from transformers import AutoTokenizer

        pretrained = checkpoint_folder(self.config.pretrained, "the pretrained model")
        clip = _clip_model(pretrained)
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained), local_files_only=True)
        scale = clip.logit_scale.detach().exp().float()
        for task in tasks:
            weight = _clip.zero_shot_weights(clip, tokenizer, clip_classes(task), templates_of(task))
            folder = checkpoint_folder(task.checkpoint, f"the checkpoint of task {task.name!r}")
            encoder = _clip_vision_state(folder, reference)
            self._write_task(task, encoder, {"weight": weight, "logit_scale": scale}, reference, folder)


def _clip_model(folder: Path):
    from transformers import CLIPModel

    with quiet_transformers():
        model, info = CLIPModel.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    if info["missing_keys"]:
        raise CheckpointError(f"{folder}: CLIPModel weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
    return model.float().eval()


def _clip_vision_state(folder: Path, pretrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image encoder state of a fine-tuned CLIPModel, CLIPVisionModelWithProjection or
    CLIPVisionModel folder (the last with the pretrained projection)."""
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    config = read_model_config(folder)
    if config.get("model_type") == "clip":
        cls = CLIPModel
    elif "CLIPVisionModelWithProjection" in (config.get("architectures") or []):
        cls = CLIPVisionModelWithProjection
    else:
        cls = CLIPVisionModel
    with quiet_transformers():
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    missing = [key for key in info["missing_keys"] if "text" not in key and "logit_scale" not in key]
    if missing:
        raise CheckpointError(f"{folder}: {cls.__name__} weights missing from the checkpoint: {sorted(missing)[:5]}")
    tower = getattr(model, "vision_model", model)
    state = {f"vision_model.{key}": value.detach().float() for key, value in tower.state_dict().items()}
    projection = getattr(model, "visual_projection", None)
    state["visual_projection.weight"] = (projection.weight.detach().float() if projection is not None
                                         else pretrained["visual_projection.weight"])
    return state


# --- classes, templates, labels ---------------------------------------------------------------------------
def templates_of(task: TaskConfig) -> tuple[str, ...]:
    """The task's prompt templates with the class name as ``{c}``."""
    if task.templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(task.templates, str):
        return TEMPLATES[task.templates]
    return tuple(template.replace("{}", "{c}") for template in task.templates)


def check_templates(config: SuiteConfig, task: TaskConfig) -> None:
    key = f"tasks.{task.name}.templates"
    if isinstance(task.templates, str):
        if task.templates not in TEMPLATES:
            raise config.error(f"no template set {task.templates!r}; the named sets: {', '.join(TEMPLATES)}, or "
                               "write a list of templates", key)
        return
    for template in task.templates or ():
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as error:
            raise config.error(f"template {template!r} is not a format string ({error})", key) from None
        if len(fields) != 1 or fields[0] not in ("", "c"):
            raise config.error(f"template {template!r} must mark the class name once, with {{}} or {{c}}", key)


@functools.lru_cache(maxsize=64)
def clip_classes(task: TaskConfig) -> tuple[str, ...]:
    """A CLIP task's class names, in label order (see the module docstring)."""
    if task.classes is not None:
        return task.classes
    splits = [image_split(task, split) for split in ("train", "test")]
    if all(split.folders is not None for split in splits):
        return tuple(sorted(set(splits[0].folders) | set(splits[1].folders)))
    recorded = recorded_class_names(task, "test") or recorded_class_names(task, "train")
    if recorded:
        return recorded
    labels = np.concatenate([split.labels for split in splits])
    if len(labels) and not np.issubdtype(np.asarray(labels.tolist()).dtype, np.number):
        return tuple(sorted(set(map(str, labels))))
    raise LookupError(task.name)


def head_classes(config: SuiteConfig, task: TaskConfig) -> tuple[str, ...]:
    if config.kind == "clip":
        try:
            return clip_classes(task)
        except LookupError:
            raise config.error("the labels are class indices and nothing names the classes: list them in "
                               "label order with `classes = [...]`", f"tasks.{task.name}.classes") from None
    return class_names(task)


def label_indices(labels: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Raw labels as class indices: integers as they are, names by their position in ``classes`` (-1: none)."""
    values = np.asarray(labels.tolist()) if labels.dtype == object and len(labels) else labels
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(str(value), -1) for value in labels], dtype=np.int64)


# --- data -------------------------------------------------------------------------------------------------
class ImageSuiteTaskData(TaskData):
    """An image suite file's tasks read through its backbone: images decoded with PIL and made
    into pixel values by its image processor, labels as the head's indices."""

    def __init__(self, backbone: ImageSuiteBackbone):
        self.backbone = backbone

    def head(self, task: str) -> nn.Module:
        backbone = self.backbone
        backbone.check_task(task)
        state = load_file(str(backbone.require(backbone.head_path(task))))
        if isinstance(backbone, CLIPSuiteBackbone):
            return _clip.ZeroShotHead(state["weight"], state["logit_scale"])
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(str(backbone.require(backbone.root / f"{task}.config")), local_files_only=True)
        with quiet_transformers(), torch.device("meta"):
            model = AutoModelForImageClassification.from_config(config)
        head = model.classifier
        head.load_state_dict(state, strict=True, assign=True)
        return head

    def split(self, task: str, split: str) -> tuple[ImageSplit, np.ndarray]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid: train, test")
        config = self.backbone.task_config(task)
        images = image_split(config, split)
        return images, label_indices(images.labels, head_classes(self.backbone.config, config))

    def split_size(self, task: str, split: str) -> int:
        return len(self.split(task, split)[0].images)

    def pixels(self, images: ImageSplit, positions: range | list[int]) -> torch.Tensor:
        opened = [open_image(images, position) for position in positions]
        return self.backbone.processor(images=opened, return_tensors="pt")["pixel_values"]

    def batch(self, task: str, split: str, start: int, stop: int) -> Batch:
        images, labels = self.split(task, split)
        positions = range(start, min(stop, len(images.images)))
        return {"pixel_values": self.pixels(images, positions)}, torch.from_numpy(labels[start:stop])

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        images, _ = self.split(task, split)
        if n > len(images.images):
            raise ValueError(f"{self.backbone.name}/{task}: {n} exemplars asked, the {split} split has {len(images.images)}")
        picks = sorted(np.random.default_rng([seed, _stable_hash(task)]).choice(len(images.images), n, replace=False).tolist())
        return {"pixel_values": self.pixels(images, picks)}


# --- checks and registration ------------------------------------------------------------------------------
def check_data(config: SuiteConfig, task: TaskConfig, classes: tuple[str, ...]) -> None:
    """Each split's image folder or columns, and its labels against the head's classes."""
    key = f"tasks.{task.name}"
    seen = []
    for split in ("train", "test"):
        where = describe_split(task, split)
        if is_folder(task, split):
            for option in ("image", "label"):
                if option in task.keys:
                    raise config.error(f"{where} is an image folder (its class folders are the labels): it has no "
                                       f"{option} column", f"{key}.{option}")
            images = image_split(task, split)
            if not images.folders:
                raise config.error(f"image folder {where} has no class folders (<class>/*.png|jpg)", f"{key}.{split}")
        else:
            for option in ("image", "label"):
                if option not in task.keys:
                    raise config.error(f"missing key '{key}.{option}': {where} is not an image folder, so name its "
                                       f"{option} column")
            frame = read_split(task, split)
            for option in ("image", "label"):
                column = getattr(task, option)
                if column not in frame.columns:
                    raise config.error(f"column {column!r} is not in {where}; its columns: "
                                       f"{', '.join(map(str, frame.columns))}", f"{key}.{option}")
            images = image_split(task, split)
            broken = [i for i, image in enumerate(images.images)
                      if image is None or (isinstance(image, Path) and not image.is_file())]
            if broken:
                raise config.error(f"row {broken[0]} of {where} has no image: {frame[task.image].iloc[broken[0]]!r} "
                                   "is neither image bytes nor the path of an existing file", f"{key}.image")
        if not images.images:
            raise config.error(f"{where} has no images", f"{key}.{split}")
        labels = label_indices(images.labels, classes)
        bad = images.labels[(labels < 0) | (labels >= len(classes))]
        if len(bad):
            named = "id2label" if config.kind == "image-classification" else "classes"
            raise config.error(f"label {bad[0]!r} in {where} is not one of the head's {len(classes)} classes "
                               f"({named}: {', '.join(classes)})", f"{key}.label")
        seen.append(labels)
    distinct = len(np.unique(np.concatenate(seen)))
    if distinct != len(classes):
        raise config.error(f"the data has {distinct} distinct labels, the head of {task.checkpoint.describe()} has "
                           f"{len(classes)} outputs ({', '.join(classes)})", f"{key}.label")


def check(config: SuiteConfig) -> dict[str, tuple[str, ...]]:
    """What the files hold, before any work: one architecture, heads, image processor, image
    folders and columns, labels that fit each head. The classes of each task."""
    clip = config.kind == "clip"
    config.check_keys(unused=("text",) if clip else ("text", "classes", "templates"))
    pretrained = read_model_config(checkpoint_folder(config.pretrained, f"the pretrained model of suite {config.name!r}"))
    model_type = pretrained.get("model_type")
    if clip and model_type != "clip":
        raise config.error(f"{config.pretrained.describe()} is a {model_type!r} model; kind 'clip' needs a CLIPModel, "
                           "whose text tower builds the zero-shot heads", "pretrained")
    classes = {}
    for task in config.tasks:
        key = f"tasks.{task.name}"
        model = read_model_config(checkpoint_folder(task.checkpoint, f"the checkpoint of task {task.name!r}"))
        architectures = model.get("architectures") or []
        if clip:
            if model.get("model_type") not in CLIP_VISION_TYPES:
                raise config.error(f"{task.checkpoint.describe()} is a {model.get('model_type')!r} model, the pretrained "
                                   f"model {config.pretrained.describe()} a 'clip' one: architectures differ "
                                   "(a CLIPModel, CLIPVisionModelWithProjection or CLIPVisionModel is needed)",
                                   f"{key}.checkpoint")
            if difference := shape_difference(model.get("vision_config", model), pretrained.get("vision_config", {})):
                raise config.error(f"{task.checkpoint.describe()} has a vision tower of {difference}: architectures "
                                   "differ", f"{key}.checkpoint")
            check_templates(config, task)
        else:
            if model.get("model_type") != model_type:
                raise config.error(f"{task.checkpoint.describe()} is a {model.get('model_type')!r} model, the pretrained "
                                   f"model {config.pretrained.describe()} a {model_type!r} one: architectures differ",
                                   f"{key}.checkpoint")
            if not any(name.endswith("ForImageClassification") for name in architectures):
                raise config.error(f"{task.checkpoint.describe()} is {', '.join(architectures) or 'no named architecture'}, "
                                   "not a *ForImageClassification", f"{key}.checkpoint")
            if difference := shape_difference(model, pretrained):
                raise config.error(f"{task.checkpoint.describe()} has {difference}: architectures differ",
                                   f"{key}.checkpoint")
        if task.metric == "pearson_spearman":
            raise config.error("pearson_spearman scores a regression head; image tasks are scored by accuracy or "
                               "matthews", f"{key}.metric")
        classes[task.name] = head_classes(config, task)
        check_data(config, task, classes[task.name])
    processor_folder(config)
    return classes


def build(config: SuiteConfig) -> None:
    """Check an image suite file's contents, then register its suite and backbone."""
    classes = check(config)
    tasks = [Task(task.name, classes[task.name], metric=task.metric or "accuracy") for task in config.tasks]
    register_suite(Suite(config.name, tasks, ImageSuiteTaskData, description=config.description or f"from {config.path}"))
    base = CLIPSuiteBackbone if config.kind == "clip" else ImageClassifierBackbone
    backbone = type(f"SuiteFile_{config.name.replace('-', '_')}", (base,), {
        "name": config.name, "suite": config.name, "config": config,
        "task_names": tuple(task.name for task in config.tasks),
        "description": config.description or f"suite file {config.path}",
    })
    register_backbone(config.name)(backbone)


register_suite_kind("image-classification")(build)
register_suite_kind("clip")(build)
