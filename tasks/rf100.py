"""The ``rf100`` suite: DETR-ResNet50 (Carion et al., "End-to-End Object Detection with
Transformers", ECCV 2020; transformers' ``DetrForObjectDetection``, pretrained
``facebook/detr-resnet-50``) fine-tuned on seven domains of Roboflow 100 (Ciaglia et al.
2022), scored by mAP@50: the detection benchmark of Auto-FlexSwitch (§IV-A2, Table VII).

Nothing here can be downloaded automatically (the fine-tuned checkpoints have no known
hub ids, RF100 needs a Roboflow key), so both come from local folders:

Data (``--data-dir`` / ``$MERGEBENCH_DATA_DIR``): RF100 in COCO format, as its download
script (github.com/roboflow/roboflow-100-benchmark) writes it::

    <data-dir>/<dataset>/{train,valid,test}/_annotations.coco.json   (+ the images beside it)

One dataset per domain. The paper names the domains, not the datasets; the defaults
(``DEFAULT_DATASETS``) are the first dataset of each category of RF100's
``metadata/categories.csv``; ``<data-dir>/domains.json`` ({"aerial": "aerial-spheres",
...}) overrides any of them. Evaluation uses the test split, exemplars are seeded train
images. A model's class index c is its dataset's category id c (Roboflow numbers
categories 0..n-1, id 0 being the dataset's super-category), as transformers' DETR
fine-tuning recipe maps them; ``prepare`` checks every category id against the model's
label count and, when the config names its labels, the names.

Checkpoints (``--checkpoint-dir`` / ``$MERGEBENCH_CHECKPOINT_DIR``), folders written by
``DetrForObjectDetection.save_pretrained`` (config.json + model.safetensors, or
pytorch_model.bin, loaded with weights_only)::

    <checkpoint-dir>/pretrained/   optional; else facebook/detr-resnet-50 at revision
                                   "no_timm" from the Hugging Face cache (or the hub, if reachable)
    <checkpoint-dir>/<domain>/     one per domain of DOMAINS, fine-tuned from the pretrained model

What is merged: every tensor but the class head. ``class_labels_classifier`` has one row
per class of its dataset, so it stays per task (as every suite's heads do); the ResNet
backbone (whose frozen batch-norm statistics fine-tuning leaves unchanged), the
transformer, the object-query embeddings and the box MLP (``bbox_predictor``, the same
shape for every domain) are merged. The paper does not list the merged tensors; this is
all it can merge.

``prepare`` converts the folders (through ``from_pretrained``, so older checkpoint layouts
load) into safetensors under ``mergebench.cache.cache_dir()/detr-r50``: the merged part of
every model, one head file and one label list per domain, the architecture config, the
pretrained folder's preprocessor config (else DETR's defaults: shortest edge 800, longest
1333) and a manifest recording the sources and the data folder, so that a later ``run``
needs neither option. A checkpoint that changed on disk is converted again.

Backbone implementations: facebook/detr-resnet-50's main revision uses a timm ResNet
(``use_timm_backbone=True``); timm imports torchvision, which has to match the installed
torch (``pip install timm`` next to a matching torchvision). Checkpoints with
``use_timm_backbone=False`` (transformers' own ResNet through AutoBackbone, e.g. the
"no_timm" revision) need neither. Pretrained and fine-tuned models must use the same one.

Model interface: the encoder maps pixels to (B, Q, d_model + 4), each object query's
last decoder state and its sigmoid box (cx, cy, w, h); a task's head maps that to
(B, Q, C + 1 + 4), class logits ("no object" last) and the box. A task
(``DetectionTask``) has no single output vector per input, so methods that need one do
not apply; routers compare the decoder states, one vector per object query, and compose
each image by the majority vote of its queries (``mergebench.dynamic.KNNRouter``).
"""
from __future__ import annotations

import json
import os
import socket
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mergebench.cache import cache_dir, write_atomically, write_json
from mergebench.errors import MissingResourceError
from mergebench.pool import CheckpointError
from mergebench.registry import register_backbone, register_suite
from mergebench.suite import Suite
from mergebench.task import Batch, Task, TaskData
from mergebench.tasks._detr import detections_from_detr, map50
from mergebench.tasks._prepared import PreparedBackbone

DOMAINS = ("aerial", "videogames", "microscopic", "underwater", "documents", "electromagnetic", "real-world")
DEFAULT_DATASETS = {
    "aerial": "aerial-pool",
    "videogames": "apex-videogame",
    "microscopic": "stomata-cells",
    "underwater": "underwater-pipes-4ng4t",
    "documents": "tweeter-posts",
    "electromagnetic": "thermal-dogs-and-people-x6ejw",
    "real-world": "hand-gestures-jps7z",
}
HUB_ID, HUB_REVISION = "facebook/detr-resnet-50", "no_timm"
ANNOTATIONS = "_annotations.coco.json"
SPLITS = ("train", "valid", "test")
HEAD_PREFIX = "class_labels_classifier."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# config fields that change what a checkpoint computes; pretrained and fine-tuned must agree on them
ARCHITECTURE = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "activation_function",
                "position_embedding_type", "dilation")
LAYOUT = ("data: <data-dir>/<dataset>/{train,valid,test}/_annotations.coco.json + images (RF100 in COCO format); "
          "checkpoints: <checkpoint-dir>/<domain>/ (DetrForObjectDetection.save_pretrained) for the domains "
          f"{', '.join(DOMAINS)}, and optionally <checkpoint-dir>/pretrained/")
PREPARE = "mergebench prepare --backbone detr-r50 --data-dir DIR --checkpoint-dir DIR"


class DetrBody(nn.Module):
    """DetrForObjectDetection without its class head: DetrModel and the box MLP, with the
    same parameter names, and the same inference computation as its forward."""

    def __init__(self, config):
        super().__init__()
        from transformers import DetrModel
        from transformers.models.detr.modeling_detr import DetrMLPPredictionHead

        self.model = DetrModel(config)
        self.bbox_predictor = DetrMLPPredictionHead(config.d_model, config.d_model, 4, num_layers=3)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask).last_hidden_state
        return torch.cat([hidden, self.bbox_predictor(hidden).sigmoid()], dim=-1)


class DetrClassHead(nn.Module):
    """A task's class_labels_classifier on the decoder states; the boxes pass through."""

    def __init__(self, d_model: int, logits: int):
        super().__init__()
        self.d_model = d_model
        self.classifier = nn.Linear(d_model, logits)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(features[..., : self.d_model]), features[..., self.d_model :]], dim=-1)


@dataclass(frozen=True)
class CocoSplit:
    """One split of a Roboflow COCO export: the json (as loaded) and its folder."""

    path: Path
    dataset: dict[str, Any]

    @property
    def images(self) -> list[dict[str, Any]]:
        return sorted(self.dataset["images"], key=lambda image: image["id"])

    def image_path(self, image: dict[str, Any]) -> Path:
        return self.path.parent / image["file_name"]


def load_coco(path: Path) -> CocoSplit:
    """A COCO detection json, checked for the fields evaluation reads."""
    try:
        dataset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{path}: key {key!r} is missing or not a list (a COCO detection json has images, "
                             "annotations and categories)")
    for kind, fields in (("images", ("id", "file_name", "width", "height")),
                         ("annotations", ("id", "image_id", "category_id", "bbox")),
                         ("categories", ("id", "name"))):
        for entry in dataset[kind]:
            missing = [field for field in fields if field not in entry]
            if missing:
                raise ValueError(f"{path}: an entry of {kind!r} lacks {', '.join(missing)}: {json.dumps(entry)[:200]}")
    image_ids = {image["id"] for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotation {annotation['id']} refers to image {annotation['image_id']}, "
                             "which is not in 'images'")
        if len(annotation["bbox"]) != 4:
            raise ValueError(f"{path}: annotation {annotation['id']} has bbox {annotation['bbox']}, not [x, y, w, h]")
    return CocoSplit(path, dataset)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a connection (a quick probe, so that an
    offline machine fails in seconds instead of after the hub client's retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_detr(source: Path | str):
    """DetrForObjectDetection from a save_pretrained folder, or the pretrained hub model
    (``HUB_ID`` at ``HUB_REVISION``, from the local cache first) when ``source`` is "hub"."""
    from transformers import DetrForObjectDetection
    from transformers.utils import logging

    logging.disable_progress_bar()
    if source == "hub":
        name, kwargs = HUB_ID, {"revision": HUB_REVISION, "local_files_only": True}
        try:
            DetrForObjectDetection.from_pretrained(name, output_loading_info=True, **kwargs)
        except OSError:
            if not _hub_reachable():
                raise MissingResourceError(
                    f"the pretrained DETR is missing: no <checkpoint-dir>/pretrained/ folder, {HUB_ID} "
                    f"(revision {HUB_REVISION}) is not in the Hugging Face cache and the hub cannot be reached. "
                    f"Save it with DetrForObjectDetection.from_pretrained('{HUB_ID}', revision='{HUB_REVISION}')"
                    ".save_pretrained('<checkpoint-dir>/pretrained') on a machine with network"
                ) from None
            kwargs["local_files_only"] = False
    else:
        name, kwargs = str(source), {"local_files_only": True}
    try:
        model, info = DetrForObjectDetection.from_pretrained(name, output_loading_info=True, **kwargs)
    except ImportError as error:  # a timm backbone without (a working) timm
        raise CheckpointError(
            f"{source}: its backbone needs a package that cannot be imported ({error}). A timm backbone "
            "(use_timm_backbone=True) needs `pip install timm` with a torchvision matching torch; checkpoints "
            "with use_timm_backbone=False (e.g. facebook/detr-resnet-50 revision 'no_timm') need neither"
        ) from error
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{source}: not a loadable DetrForObjectDetection checkpoint ({error})") from error
    incomplete = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "mismatched_keys") if info.get(kind)}
    if incomplete:  # from_pretrained would leave those tensors randomly initialised
        raise CheckpointError(f"{source}: the checkpoint does not cover the model its config describes: "
                              + "; ".join(f"{kind} {keys[:5]}" for kind, keys in incomplete.items()))
    return model.eval()


def _labels(config) -> list[str]:
    return [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]


def _split_state(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(merged part, class head) of a DetrForObjectDetection state dict."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    body = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    return body, head


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


@register_backbone("detr-r50")
class RF100Detr(PreparedBackbone):
    name = "detr-r50"
    suite = "rf100"
    task_names = DOMAINS
    prepare_hint = f"with --data-dir DIR --checkpoint-dir DIR ({LAYOUT})"
    description = ("DETR-ResNet50 fine-tuned on 7 RF100 domains, mAP@50 (local data and checkpoints: "
                   "prepare --data-dir --checkpoint-dir)")

    def __init__(self, checkpoint_dir: Path | str | None = None, data_dir: Path | str | None = None,
                 root: Path | str | None = None):
        super().__init__(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
        self.root = Path(root) if root is not None else cache_dir() / self.name
        self._splits: dict[tuple[str, str], CocoSplit] = {}

    # --- locations ----------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def data_root(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        recorded = self.manifest().get("data_dir")
        if recorded:
            return Path(recorded)
        raise MissingResourceError(f"{self.name}: no RF100 data folder: pass --data-dir (or set $MERGEBENCH_DATA_DIR) "
                                   f"to `{PREPARE}`; {LAYOUT}")

    def datasets(self) -> dict[str, str]:
        """Domain -> RF100 dataset folder: the defaults, overridden by <data-dir>/domains.json."""
        datasets = dict(DEFAULT_DATASETS)
        path = self.data_root() / "domains.json"
        if path.exists():
            try:
                chosen = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from None
            if not isinstance(chosen, dict) or not all(isinstance(v, str) for v in chosen.values()):
                raise ValueError(f"{path}: expected an object {{domain: dataset folder name}}")
            unknown = set(chosen) - set(DOMAINS)
            if unknown:
                raise ValueError(f"{path}: unknown domain(s) {', '.join(sorted(unknown))}; domains: {', '.join(DOMAINS)}")
            datasets.update(chosen)
        return datasets

    def split(self, task: str, split: str) -> CocoSplit:
        self.check_task(task)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if (task, split) not in self._splits:
            dataset = self.datasets()[task]
            path = self.data_root() / dataset / split / ANNOTATIONS
            if not path.is_file():
                raise MissingResourceError(
                    f"{path} is missing: the {split} split of RF100 dataset {dataset!r} (domain {task!r}). "
                    f"Download RF100 in COCO format (github.com/roboflow/roboflow-100-benchmark) and pass its folder "
                    f"as --data-dir; another dataset for a domain: <data-dir>/domains.json. {LAYOUT}")
            self._splits[task, split] = load_coco(path)
        return self._splits[task, split]

    # --- the models -------------------------------------------------------------------
    def labels(self, task: str) -> list[str]:
        """The class names of the task's fine-tuned model, index = category id."""
        self.check_task(task)
        return json.loads(self.require(self.root / f"{task}.labels.json").read_text())

    @cached_property
    def config(self):
        from transformers import DetrConfig

        return DetrConfig.from_json_file(str(self.require(self.root / "config.json")))

    def build_encoder(self) -> nn.Module:
        return DetrBody(self.config)

    @cached_property
    def processor(self):
        """DETR's image processor with the pretrained model's settings (else its defaults)."""
        try:  # transformers >= 5: the PIL backend; the default one needs torchvision
            from transformers import DetrImageProcessorPil as Processor
        except ImportError:
            from transformers import DetrImageProcessor as Processor
        path = self.root / "preprocessor_config.json"
        settings = json.loads(path.read_text()) if path.exists() else {}
        for key in ("image_processor_type", "processor_class"):
            settings.pop(key, None)
        return Processor.from_dict(settings)

    # --- preparation ----------------------------------------------------------------
    def prepare(self, force: bool = False) -> None:
        """Check the data; convert the checkpoints if they are new or changed (or ``force``)."""
        if self.checkpoint_dir is None and self.data_dir is None and not self.manifest():
            raise MissingResourceError(f"{self.name} is not prepared: run `{PREPARE}` with RF100 and the DETR "
                                       f"checkpoints on this machine ({LAYOUT}); see README, RF100")
        missing_data = self._missing_data()  # data and checkpoints alike, all named before any conversion
        sources = self._sources() if self.checkpoint_dir is not None else {}
        missing = missing_data + self._missing_sources(sources)
        if missing:
            listed = "\n".join(f"  - {item}" for item in missing)
            download = ("Download RF100 in COCO format (github.com/roboflow/roboflow-100-benchmark) and pass its folder "
                        "as --data-dir; another dataset for a domain: <data-dir>/domains.json.\n") if missing_data else ""
            raise MissingResourceError(f"{self.name}: {len(missing)} data files or checkpoint folders are missing:\n"
                                       f"{listed}\n{download}{LAYOUT}")
        for domain in DOMAINS:
            for split in ("train", "test"):
                self.split(domain, split)
        converted = self._converted()
        if self.checkpoint_dir is None:
            if not converted:
                raise MissingResourceError(
                    f"{self.name}: no converted checkpoints under {self.root}: pass --checkpoint-dir (or set "
                    f"$MERGEBENCH_CHECKPOINT_DIR) to `{PREPARE}`; {LAYOUT}")
        else:
            signature = {name: _signature(source) for name, source in sources.items()}
            if force or not converted or self.manifest().get("sources") != signature:
                self._convert(sources, signature)
        self._check_labels()
        manifest = self.manifest()
        if manifest.get("data_dir") != str(self.data_root().resolve()):
            write_json(self.root / "manifest.json", {**manifest, "data_dir": str(self.data_root().resolve())})

    def _converted(self) -> bool:
        names = ["config.json", "pretrained.safetensors"] + [
            f"{domain}{suffix}" for domain in DOMAINS for suffix in (".safetensors", ".head.safetensors", ".labels.json")]
        return bool(self.manifest().get("sources")) and all((self.root / name).exists() for name in names)

    def _missing_data(self) -> list[str]:
        """The annotation files of the domains' train and test splits that are not there."""
        try:
            root, datasets = self.data_root(), self.datasets()
        except MissingResourceError as error:
            return [str(error)]
        missing = []
        for domain in DOMAINS:
            for split in ("train", "test"):
                path = root / datasets[domain] / split / ANNOTATIONS
                if not path.is_file():
                    missing.append(f"{path} (the {split} split of RF100 dataset {datasets[domain]!r}, domain {domain!r})")
        return missing

    def _sources(self) -> dict[str, Path | str]:
        """pretrained (a folder, else "hub") + one folder per domain."""
        root = self.checkpoint_dir
        sources: dict[str, Path | str] = {"pretrained": root / "pretrained" if (root / "pretrained").is_dir() else "hub"}
        sources.update({domain: root / domain for domain in DOMAINS})
        return sources

    @staticmethod
    def _missing_sources(sources: dict[str, Path | str]) -> list[str]:
        """The checkpoint folders that are absent or hold no model."""
        missing = []
        for folder in sources.values():
            if not isinstance(folder, Path):
                continue
            if not folder.is_dir():
                missing.append(f"{folder} (no folder)")
            elif not (folder / "config.json").is_file():
                missing.append(f"{folder} (no config.json)")
            elif not any((folder / name).is_file() for name in WEIGHT_FILES):
                missing.append(f"{folder} (no {' or '.join(WEIGHT_FILES)})")
        return missing

    def _convert(self, sources: dict[str, Path | str], signature: dict[str, Any]) -> None:
        (self.root / "manifest.json").unlink(missing_ok=True)  # a conversion cut short leaves nothing usable
        self.__dict__.pop("config", None)
        self.__dict__.pop("processor", None)
        pretrained = load_detr(sources["pretrained"])
        architecture = {key: getattr(pretrained.config, key, None) for key in ARCHITECTURE}
        body, _ = _split_state(pretrained)
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in body.items()}
        _save(self.root / "pretrained.safetensors", body)
        write_atomically(self.root / "config.json", lambda tmp: tmp.write_text(pretrained.config.to_json_string()))
        processor = sources["pretrained"] / "preprocessor_config.json" if isinstance(sources["pretrained"], Path) else None
        if processor is not None and processor.is_file():
            write_atomically(self.root / "preprocessor_config.json", lambda tmp: tmp.write_text(processor.read_text()))
        else:
            (self.root / "preprocessor_config.json").unlink(missing_ok=True)
        del pretrained, body
        for domain in tqdm(DOMAINS, desc=f"{self.name}: converting", unit="model", leave=False):
            folder = sources[domain]
            model = load_detr(folder)
            theirs = {key: getattr(model.config, key, None) for key in ARCHITECTURE}
            if theirs != architecture:
                diff = {k: (architecture[k], theirs[k]) for k in ARCHITECTURE if architecture[k] != theirs[k]}
                raise CheckpointError(f"{folder}/config.json: architecture differs from the pretrained model's "
                                      f"(field: (pretrained, fine-tuned)): {diff}")
            body, head = _split_state(model)
            if {k: (tuple(v.shape), v.dtype) for k, v in body.items()} != shapes:
                different = sorted(set(body) ^ set(shapes)) or [k for k in body if (tuple(body[k].shape), body[k].dtype) != shapes[k]]
                raise CheckpointError(f"{folder}: tensors differ from the pretrained model's (e.g. {different[:5]}); "
                                      "pretrained and fine-tuned models must share one backbone implementation")
            if set(head) != {"weight", "bias"}:
                raise CheckpointError(f"{folder}: no class_labels_classifier weight and bias")
            _save(self.root / f"{domain}.safetensors", body)
            _save(self.root / f"{domain}.head.safetensors", head)
            write_json(self.root / f"{domain}.labels.json", _labels(model.config))
            del model, body, head
        write_json(self.root / "manifest.json", {"sources": signature, "data_dir": str(self.data_root().resolve())})

    def _check_labels(self) -> None:
        """Every category of a domain's splits must be a class of its model (same name, when the model names them)."""
        for domain in DOMAINS:
            labels = self.labels(domain)
            named = labels != [f"LABEL_{i}" for i in range(len(labels))]
            for split in ("train", "test"):
                coco = self.split(domain, split)
                for category in coco.dataset["categories"]:
                    index, name = category["id"], str(category["name"])
                    if not 0 <= index < len(labels):
                        raise CheckpointError(
                            f"{coco.path}: category {index} ({name!r}) is not a class of the {domain!r} model, "
                            f"which has {len(labels)} (ids 0..{len(labels) - 1}); is it fine-tuned on this dataset?")
                    if named and labels[index] != name:
                        raise CheckpointError(
                            f"{coco.path}: category {index} is {name!r}, class {index} of the {domain!r} model is "
                            f"{labels[index]!r}; is it fine-tuned on this dataset?")


class DetectionTask(Task):
    """One RF100 domain. Its head gives, per object query, class logits ("no object" last)
    and a box, so it has no single output vector per input (no capability of the generic
    task); it is scored by mAP@50 on the test split's COCO ground truth."""

    routes_by_parts = True  # one decoder state per object query; an image is composed by their vote
    capabilities = frozenset()

    def __init__(self, name: str):
        super().__init__(name, metric="map50", outputs="detection")

    def score(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
        """mAP@50 on the test split of the (B, Q, C + 1 + 4) outputs of the batches of image ids."""
        coco = self._data().coco(self.name, "test")
        sizes = {image["id"]: (image["height"], image["width"]) for image in coco.images}
        detections = []
        for output, image_ids in zip(outputs, targets):
            ids = image_ids.tolist()
            detections += detections_from_detr(output[..., :-4], output[..., -4:], ids, [sizes[i] for i in ids])
        return map50(coco.dataset, detections)

    def routing_features(self, features: torch.Tensor) -> torch.Tensor:
        """The decoder state of every object query, (B, Q, d_model): the features without the box."""
        return features[..., :-4]


class RF100TaskData(TaskData):
    """The RF100 domains read through the detr-r50 backbone: the COCO exports of its data
    folder, DETR's image processor, and each fine-tuned model's class head."""

    def __init__(self, backbone: RF100Detr):
        self.backbone = backbone

    def coco(self, task: str, split: str) -> CocoSplit:
        return self.backbone.split(task, split)

    def classes(self, task: str) -> tuple[str, ...]:
        return tuple(self.backbone.labels(task))

    def head(self, task: str) -> nn.Module:
        backbone = self.backbone
        backbone.check_task(task)
        state = load_file(str(backbone.require(backbone.root / f"{task}.head.safetensors")))
        head = DetrClassHead(backbone.config.d_model, state["weight"].shape[0])
        head.classifier.load_state_dict(state)
        return head

    def pixels(self, split: CocoSplit, images: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """pixel_values and pixel_mask of some images of a split (padded to the largest)."""
        from PIL import Image

        loaded = []
        for image in images:
            path = split.image_path(image)
            try:
                with Image.open(path) as handle:
                    loaded.append(handle.convert("RGB"))
            except FileNotFoundError:
                raise MissingResourceError(f"image {path} is missing (listed in {split.path})") from None
        encoded = self.backbone.processor(images=loaded, return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "pixel_mask": encoded["pixel_mask"]}

    def split_size(self, task: str, split: str) -> int:
        return len(self.coco(task, split).images)

    def batch(self, task: str, split: str, start: int, stop: int) -> Batch:
        """(pixels, image ids) of images start..stop-1, in image-id order."""
        coco = self.coco(task, split)
        chunk = coco.images[start:stop]
        return self.pixels(coco, chunk), torch.tensor([image["id"] for image in chunk])

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        coco = self.coco(task, split)
        images = coco.images
        if n > len(images):
            raise ValueError(f"{self.backbone.name}/{task}: {n} exemplars asked, the {split} split has {len(images)} images")
        picks = np.random.default_rng([seed, zlib.crc32(task.encode())]).choice(len(images), size=n, replace=False)
        return self.pixels(coco, [images[i] for i in sorted(picks)])


register_suite(Suite("rf100", [DetectionTask(domain) for domain in DOMAINS], RF100TaskData,
                     description="7 Roboflow 100 detection domains, mAP@50 (local data)"))


def _signature(source: Path | str) -> Any:
    """What identifies a checkpoint's content cheaply: its files' sizes and modification times."""
    if not isinstance(source, Path):
        return f"{HUB_ID}@{HUB_REVISION}"
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    return {"folder": str(source.resolve()), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}
