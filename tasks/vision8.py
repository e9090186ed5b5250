"""The ``vision-8`` suite: SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and
DTD, the eight image classification tasks of the task-arithmetic line of work (Ilharco
et al. 2023) and of the T-Switch / FlexSwitch papers, with the checkpoints FusionBench
(Tang et al. 2024) publishes.

Backbones:

- ``clip-vit-b32`` / ``clip-vit-l14``: the pretrained CLIP image encoder (vision tower +
  projection) and one fine-tuned encoder per task; each task's head is CLIP's zero-shot
  head from the pretrained text tower (``tasks/_clip.py``). Two checkpoint families:

  * ``huggingface`` (FusionBench): ``openai/clip-vit-base-patch32`` (the full CLIPModel:
    its text tower builds the heads) and ``tanganke/clip-vit-base-patch32_<task>``
    (CLIPVisionModel; the projection is the pretrained one, as FusionBench keeps it);
    likewise ``openai/clip-vit-large-patch14`` / ``tanganke/clip-vit-large-patch14_<task>``.
  * ``open_clip`` (task_vectors / EMR-Merging): ``zeroshot.pt`` and ``<Task>/finetuned.pt``
    state dicts (Task: SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD), converted
    by the key mapping documented in ``tasks/_clip.py``. The heads, the image processor
    and the encoder config still come from the Hugging Face pretrained CLIPModel (the same
    OpenAI weights).

- ``convnext-base``: FusionBench's ``facebook/convnext-base-224`` and
  ``tanganke/convnext-base-224_<task>_sgd_batch-size-64_lr-0.01_steps-4000``
  (ConvNextForImageClassification); the encoder is the ConvNeXt trunk (pooled features), each
  task's head is the linear classifier of its fine-tuned checkpoint, kept fixed.

Where things are looked for (first hit wins; the network only when nothing local is found):

  checkpoints  --checkpoint-dir DIR ($MERGEBENCH_CHECKPOINT_DIR):
                 DIR/<hub id>/ (e.g. DIR/openai/clip-vit-base-patch32/,
                 DIR/tanganke/clip-vit-base-patch32_sun397/) or DIR/pretrained/ and DIR/<task>/,
                 each a `save_pretrained` folder (config.json + model.safetensors);
                 open_clip family: DIR/zeroshot.pt or DIR/<arch>/zeroshot.pt (arch: ViT-B-32,
                 ViT-L-14) with <Task>/finetuned.pt (or <Task>Val/, or .safetensors) beside it;
               then the Hugging Face hub cache, then the hub.
  datasets     --data-dir DIR ($MERGEBENCH_DATA_DIR): see ``tasks/_image_data.py``
               (DIR/<task>/ from `save_to_disk`, or DIR/<hub id>/ with the parquet files);
               then the hub cache, then the hub.

``mergebench prepare`` converts whatever it finds, once, into encoder state-dict safetensors
under ``$MERGEBENCH_CACHE/<backbone>/<family>-<location hash>/`` (with the heads, the encoder
config and the image processor), so later runs need neither the originals nor the network.
"""
from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from mergebench.cache import cache_dir, update_json, write_atomically, write_json, write_safetensors
from mergebench.errors import MissingResourceError
from mergebench.pool import CheckpointError
from mergebench.registry import register_backbone, register_suite
from mergebench.suite import Suite
from mergebench.task import Batch, Task, TaskData
from mergebench.tasks import _clip, _hub, _image_data
from mergebench.tasks._image_data import DatasetSpec
from mergebench.tasks._prepared import PreparedBackbone
from mergebench.tasks._text_classification import _stable_hash
from mergebench.tasks._vision8_prompts import CLASS_NAMES, TEMPLATES

TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
DATASETS = {
    "sun397": DatasetSpec("sun397", "tanganke/sun397"),
    "stanford-cars": DatasetSpec("stanford-cars", "tanganke/stanford_cars"),
    "resisc45": DatasetSpec("resisc45", "tanganke/resisc45"),
    "eurosat": DatasetSpec("eurosat", "tanganke/eurosat"),
    "svhn": DatasetSpec("svhn", "ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": DatasetSpec("gtsrb", "tanganke/gtsrb"),
    "mnist": DatasetSpec("mnist", "ylecun/mnist"),
    "dtd": DatasetSpec("dtd", "tanganke/dtd"),
}
OPEN_CLIP_TASK_NAMES = {  # task_vectors' dataset names, the folder names of its checkpoints
    "sun397": "SUN397", "stanford-cars": "Cars", "resisc45": "RESISC45", "eurosat": "EuroSAT",
    "svhn": "SVHN", "gtsrb": "GTSRB", "mnist": "MNIST", "dtd": "DTD",
}
SPLITS = ("train", "test")
HF_PATTERNS = ("*.json", "*.txt", "*.safetensors")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_image_processor(path: Path):
    """The checkpoint's image processor, PIL-based (no torchvision)."""
    import transformers
    from transformers import AutoImageProcessor

    major = int(transformers.__version__.split(".")[0])
    return AutoImageProcessor.from_pretrained(str(path), **({"backend": "pil"} if major >= 5 else {"use_fast": False}))


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHTS)


@dataclass
class Resource:
    """Something a backbone needs: found locally, or fetched, or reported missing."""

    key: str
    what: str  # e.g. "checkpoint tanganke/clip-vit-base-patch32_sun397"
    local: Callable[[], Path | None]
    fetch: Callable[[], Path] | None = None  # None: no hub to fetch it from


class Vision8Backbone(PreparedBackbone):
    suite = "vision-8"
    prepare_hint = "(with the same --checkpoint-dir, if any)"
    task_names: ClassVar[tuple[str, ...]] = TASKS
    hf_pretrained: ClassVar[str]  # hub id of the pretrained model
    hf_finetuned: ClassVar[str]  # hub id pattern of the fine-tuned models, with {task}

    def __init__(self, checkpoint_dir: Path | str | None = None, data_dir: Path | str | None = None):
        super().__init__(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
        unknown = set(self.task_names) - set(TASKS)
        if unknown:
            raise ValueError(f"{self.name}: unknown vision-8 task(s) {sorted(unknown)}; valid: {', '.join(TASKS)}")
        self._datasets: dict[tuple[str, str], Any] = {}

    # --- where converted files live ------------------------------------------------
    @property
    def checkpoint_family(self) -> str:
        return "huggingface"

    @property
    def root(self) -> Path:
        location = str(self.checkpoint_dir.resolve()) if self.checkpoint_dir else "hub"
        digest = hashlib.sha256(location.encode()).hexdigest()[:10]
        return cache_dir() / self.name / f"{self.checkpoint_family}-{digest}"

    def head_path(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.safetensors"

    def _outputs(self) -> dict[str, Path]:
        outputs = {
            "config": self.root / "encoder_config.json",
            "processor": self.root / "processor" / "preprocessor_config.json",
            "pretrained": self.root / "pretrained.safetensors",
        }
        for task in self.task_names:
            outputs[task] = self.root / f"{task}.safetensors"
            outputs[f"head:{task}"] = self.head_path(task)
        return outputs

    # --- the encoder and its image processor ----------------------------------------------
    def build_encoder(self) -> nn.Module:
        config = json.loads(self.require(self.root / "encoder_config.json").read_text())
        return self._encoder_from_config(config)

    @cached_property
    def processor(self):
        return load_image_processor(self.require(self.root / "processor" / "preprocessor_config.json").parent)

    # --- data ---------------------------------------------------------------------------
    def dataset(self, task: str, split: str):
        """A split as a ``datasets.Dataset`` (image, label), from local copies or the hub cache."""
        self.check_task(task)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if (task, split) not in self._datasets:
            spec = DATASETS[task]
            source = _image_data.local_source(spec, self.data_dir, SPLITS)
            if source is None:
                raise MissingResourceError(self._missing_message([f"dataset {spec.hub_id} ({task})"], reason="not prepared"))
            self._datasets[(task, split)] = self._checked(_image_data.load_split(source, spec, split), task, split, source)
        return self._datasets[(task, split)]

    def _checked(self, dataset, task: str, split: str, source) -> Any:
        classes = len(CLASS_NAMES[task])
        feature = dataset.features["label"]
        names = getattr(feature, "names", None)
        if names is not None and len(names) != classes:
            raise ValueError(f"{source.describe()} ({task}/{split}): {len(names)} label names, the task has {classes} classes")
        labels = np.asarray(list(dataset["label"]), dtype=np.int64)
        if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
            raise ValueError(f"{source.describe()} ({task}/{split}): labels outside 0..{classes - 1}")
        return dataset

    # --- preparation --------------------------------------------------------------------------
    def prepare(self, force: bool = False) -> None:
        """Find (or fetch) every checkpoint and dataset, then convert what is not converted yet."""
        outputs = self._outputs()
        todo = {key for key, path in outputs.items() if force or not path.exists()}
        resources = self._checkpoint_resources(todo) if todo else []
        resources += [self._dataset_resource(task) for task in self.task_names]
        found = self._resolve(resources)
        if todo:
            self._convert(todo, found)
            sources = {k: str(v) for k, v in found.items() if not k.startswith("data:")}
            update_json(self.root / "sources.json", {**sources, "family": self.checkpoint_family})
        for task in self.task_names:
            for split in SPLITS:
                self.dataset(task, split)

    def _dataset_resource(self, task: str) -> Resource:
        spec = DATASETS[task]
        return Resource(
            f"data:{task}",
            f"dataset {spec.hub_id}" + (f" ({spec.config})" if spec.config else "") + f" for {task}",
            lambda: _image_data.local_source(spec, self.data_dir, SPLITS),
            lambda: _image_data.download_source(spec, SPLITS),
        )

    def _hf_resource(self, key: str, repo_id: str, alias: str) -> Resource:
        def local() -> Path | None:
            if self.checkpoint_dir:
                for folder in (self.checkpoint_dir / repo_id, self.checkpoint_dir / alias):
                    if _is_hf_dir(folder):
                        return folder
            snapshot = _hub.cached_snapshot(repo_id, "model", HF_PATTERNS)
            return snapshot if snapshot is not None and _is_hf_dir(snapshot) else None

        def fetch() -> Path:
            snapshot = _hub.download_snapshot(repo_id, "model", HF_PATTERNS)
            if not _is_hf_dir(snapshot):  # an older repository without safetensors
                snapshot = _hub.download_snapshot(repo_id, "model", [*HF_PATTERNS, "pytorch_model.bin*"])
            if not _is_hf_dir(snapshot):
                raise FileNotFoundError(f"{repo_id}: no config.json with model weights in {snapshot}")
            return snapshot

        return Resource(key, f"checkpoint {repo_id}", local, fetch)

    def _resolve(self, resources: list[Resource]) -> dict[str, Any]:
        """Local copies of every resource; fetches the rest if the hub answers, else one error listing all."""
        found = {r.key: r.local() for r in resources}
        missing = [r for r in resources if found[r.key] is None]
        if not missing:
            return found
        local_only = [r.what for r in missing if r.fetch is None]
        if local_only:
            raise MissingResourceError(self._missing_message(local_only, "local"))
        unreachable = _hub.unreachable_reason()
        if unreachable is not None:
            raise MissingResourceError(self._missing_message([r.what for r in missing], "offline", unreachable))
        for resource in tqdm(missing, desc=f"{self.name}: fetching", unit="item"):
            try:
                found[resource.key] = resource.fetch()
            except Exception as error:
                raise MissingResourceError(
                    f"{self.name}: could not fetch {resource.what}: {error}\n" + self._how_to_provide()
                ) from error
        return found

    def _missing_message(self, items: list[str], reason: str, detail: str = "") -> str:
        why = {
            "offline": f"and the Hugging Face Hub cannot be reached ({detail})",
            "local": "(local files: nothing to fetch them from)",
            "not prepared": f"(run `mergebench prepare --backbone {self.name}` first)",
        }[reason]
        listed = "\n".join(f"  - {item}" for item in items)
        return f"{self.name}: not found on this machine {why}:\n{listed}\n{self._how_to_provide()}"

    def _how_to_provide(self) -> str:
        example = self.hf_finetuned.format(task=self.task_names[0])
        return (
            "Provide local copies:\n"
            f"  checkpoints: --checkpoint-dir DIR (or $MERGEBENCH_CHECKPOINT_DIR) with DIR/<hub id>/, e.g. "
            f"DIR/{self.hf_pretrained}/ and DIR/{example}/ (or DIR/pretrained/ and DIR/<task>/), each a "
            "save_pretrained folder with config.json and model.safetensors"
            f"{self._open_clip_hint()}\n"
            "  datasets: --data-dir DIR (or $MERGEBENCH_DATA_DIR) with DIR/<task>/ written by "
            "DatasetDict.save_to_disk (splits train, test; columns image, label), or DIR/<hub id>/ holding "
            f"the dataset repository's parquet files (e.g. DIR/{DATASETS[self.task_names[0]].hub_id}/)\n"
            f"  or run `mergebench prepare --backbone {self.name}` once with network access "
            "(it fetches into the Hugging Face cache)."
        )

    def _open_clip_hint(self) -> str:
        return ""

    # --- what subclasses provide ----------------------------------------------------------
    @abc.abstractmethod
    def _checkpoint_resources(self, todo: set[str]) -> list[Resource]:
        """The checkpoints needed to produce the outputs in ``todo``."""

    @abc.abstractmethod
    def _convert(self, todo: set[str], found: dict[str, Any]) -> None:
        """Write the outputs in ``todo`` from the located checkpoints."""

    @abc.abstractmethod
    def _encoder_from_config(self, config: dict[str, Any]) -> nn.Module: ...

    @abc.abstractmethod
    def head_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A task's head from its saved tensors (CLIP's zero-shot head, ConvNeXt's classifier)."""

    def _save_common(self, model_dir: Path, config) -> None:
        write_json(self.root / "encoder_config.json", config.to_dict())
        processor = load_image_processor(model_dir)
        write_atomically(self.root / "processor" / "preprocessor_config.json", lambda tmp: tmp.write_text(processor.to_json_string()))


class Vision8TaskData(TaskData):
    """The vision-8 tasks read through one backbone: the datasets it prepared, its image
    processor, and the heads it keeps."""

    def __init__(self, backbone: Vision8Backbone):
        self.backbone = backbone

    def head(self, task: str) -> nn.Module:
        backbone = self.backbone
        backbone.check_task(task)
        return backbone.head_from_state(load_file(str(backbone.require(backbone.head_path(task)))))

    def split_size(self, task: str, split: str) -> int:
        return len(self.backbone.dataset(task, split))

    def batch(self, task: str, split: str, start: int, stop: int) -> Batch:
        return _image_data.batch_of(self.backbone.dataset(task, split), self.backbone.processor, start, stop)

    def exemplars(self, task: str, n: int, seed: int, split: str = "train") -> dict[str, Any]:
        rng = np.random.default_rng([seed, _stable_hash(task)])
        try:
            return _image_data.sample_inputs(self.backbone.dataset(task, split), self.backbone.processor, n, rng)
        except ValueError as error:
            raise ValueError(f"{self.backbone.name}/{task} ({split}): {error}") from error


register_suite(Suite("vision-8", [Task(name, CLASS_NAMES[name]) for name in TASKS], Vision8TaskData,
                     description="8 image classification tasks of the task-arithmetic line of work (test splits)"))


def _from_pretrained(cls, path: Path):
    """``cls.from_pretrained`` that refuses to fill missing weights with random ones."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{path}: {cls.__name__} weights missing from the checkpoint: {missing[:5]}")
    return model.float().eval()


class CLIPBackbone(Vision8Backbone):
    """Pretrained CLIP image encoder + one fine-tuned encoder per task; zero-shot heads."""

    open_clip_arch: ClassVar[str]  # task_vectors' model name: its checkpoint folder
    # `prepare --allow-pickle`: open_clip checkpoints released as pickled modules are unpickled
    # (once, into the cache as safetensors); otherwise they are refused and nothing is unpickled
    allow_pickle: bool = False

    # --- the open_clip family ------------------------------------------------------------
    def _open_clip_root(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        for folder in (self.checkpoint_dir, self.checkpoint_dir / self.open_clip_arch):
            if any((folder / f"zeroshot{ext}").is_file() for ext in (".pt", ".safetensors")):
                return folder
        return None

    @property
    def checkpoint_family(self) -> str:
        return "open_clip" if self._open_clip_root() is not None else "huggingface"

    def _open_clip_resource(self, key: str, root: Path, names: list[str], stem: str) -> Resource:
        candidates = [root / name / f"{stem}{ext}" for name in names for ext in (".pt", ".safetensors")]
        return Resource(
            key,
            f"open_clip checkpoint {' or '.join(str(c) for c in candidates)}",
            lambda: next((c for c in candidates if c.is_file()), None),
        )

    def _open_clip_hint(self) -> str:
        names = ", ".join(OPEN_CLIP_TASK_NAMES[t] for t in self.task_names)
        return (
            f"; or open_clip state dicts (task_vectors layout) DIR/zeroshot.pt or DIR/{self.open_clip_arch}/zeroshot.pt "
            f"with <Task>/finetuned.pt beside it (Task: {names}), plus the Hugging Face {self.hf_pretrained} "
            "for the text tower"
        )

    # --- preparation ---------------------------------------------------------------------
    def _checkpoint_resources(self, todo: set[str]) -> list[Resource]:
        open_clip_root = self._open_clip_root()
        resources = []
        if todo & {"config", "processor", "pretrained"} or any(k.startswith("head:") for k in todo):
            resources.append(self._hf_resource("hf:pretrained", self.hf_pretrained, "pretrained"))
        if open_clip_root is not None and "pretrained" in todo:
            resources.append(self._open_clip_resource("open_clip:pretrained", open_clip_root, [""], "zeroshot"))
        for task in self.task_names:
            if task not in todo:
                continue
            if open_clip_root is not None:
                name = OPEN_CLIP_TASK_NAMES[task]
                resources.append(self._open_clip_resource(f"ft:{task}", open_clip_root, [name, f"{name}Val"], "finetuned"))
            else:
                resources.append(self._hf_resource(f"ft:{task}", self.hf_finetuned.format(task=task), task))
        return resources

    def _convert(self, todo: set[str], found: dict[str, Any]) -> None:
        from transformers import AutoTokenizer, CLIPModel

        if "hf:pretrained" in found:
            model_dir = found["hf:pretrained"]
            clip = _from_pretrained(CLIPModel, model_dir)
            config = clip.config.vision_config
            config.projection_dim = clip.config.projection_dim  # the vision sub-config may carry a stale default
            self._save_common(model_dir, config)
            if "pretrained" in todo:
                encoder = self._encoder_from_config(config.to_dict())
                if "open_clip:pretrained" in found:
                    path = found["open_clip:pretrained"]
                    _clip.load_encoder_state(encoder, _clip.open_clip_to_hf(_clip.read_state_dict(path, self.allow_pickle), str(path)), str(path))
                else:
                    encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
                    encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
                write_safetensors(self.root / "pretrained.safetensors", encoder.state_dict(), float32=True)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            scale = clip.logit_scale.detach().exp().float()
            for task in tqdm([t for t in self.task_names if f"head:{t}" in todo], desc=f"{self.name}: zero-shot heads", unit="task"):
                weight = _clip.zero_shot_weights(clip, tokenizer, CLASS_NAMES[task], TEMPLATES[task])
                write_safetensors(self.head_path(task), {"weight": weight, "logit_scale": scale}, float32=True)
            del clip
        pretrained = load_file(str(self.root / "pretrained.safetensors"))
        encoder = self.build_encoder()  # every tensor is overwritten for each task (strict load)
        for task in tqdm([t for t in self.task_names if t in todo], desc=f"{self.name}: converting", unit="task"):
            source = found[f"ft:{task}"]
            if source.is_dir():
                state = self._hf_finetuned_state(source, pretrained)
            else:
                state = _clip.open_clip_to_hf(_clip.read_state_dict(source, self.allow_pickle), str(source))
            _clip.load_encoder_state(encoder, state, str(source))
            write_safetensors(self.root / f"{task}.safetensors", encoder.state_dict(), float32=True)

    def _hf_finetuned_state(self, model_dir: Path, pretrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder state of a fine-tuned HF checkpoint: CLIPVisionModel (projection taken from the
        pretrained model, which FusionBench keeps frozen), CLIPVisionModelWithProjection or CLIPModel."""
        from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

        config = json.loads((model_dir / "config.json").read_text())
        if config.get("model_type") == "clip":
            cls = CLIPModel
        elif "CLIPVisionModelWithProjection" in (config.get("architectures") or []):
            cls = CLIPVisionModelWithProjection
        elif config.get("model_type") == "clip_vision_model":
            cls = CLIPVisionModel
        else:
            raise CheckpointError(f"{model_dir}/config.json: model_type {config.get('model_type')!r} is not a CLIP vision model")
        model = _from_pretrained(cls, model_dir)
        tower = getattr(model, "vision_model", model)  # transformers 5 flattens CLIPVisionModel
        state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
        projection = getattr(model, "visual_projection", None)
        state["visual_projection.weight"] = projection.weight if projection is not None else pretrained["visual_projection.weight"]
        return state

    def _encoder_from_config(self, config: dict[str, Any]) -> nn.Module:
        from transformers import CLIPVisionConfig

        return _clip.CLIPImageEncoder(CLIPVisionConfig.from_dict(config))

    def head_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return _clip.ZeroShotHead(state["weight"], state["logit_scale"])


@register_backbone("clip-vit-b32")
class CLIPViTB32(CLIPBackbone):
    name = "clip-vit-b32"
    description = "CLIP ViT-B/32 fine-tuned on 8 vision tasks (FusionBench HF checkpoints, or task_vectors open_clip state dicts)"
    hf_pretrained = "openai/clip-vit-base-patch32"
    hf_finetuned = "tanganke/clip-vit-base-patch32_{task}"
    open_clip_arch = "ViT-B-32"


@register_backbone("clip-vit-l14")
class CLIPViTL14(CLIPBackbone):
    name = "clip-vit-l14"
    description = "CLIP ViT-L/14 fine-tuned on 8 vision tasks (FusionBench HF checkpoints, or task_vectors open_clip state dicts)"
    hf_pretrained = "openai/clip-vit-large-patch14"
    hf_finetuned = "tanganke/clip-vit-large-patch14_{task}"
    open_clip_arch = "ViT-L-14"


class ConvNextEncoder(nn.Module):
    """The ConvNeXt trunk of ConvNextForImageClassification (keys ``convnext.*``); returns pooled features."""

    def __init__(self, config):
        from transformers import ConvNextModel

        super().__init__()
        self.convnext = ConvNextModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.convnext(pixel_values=pixel_values).pooler_output


class ConvNextBackbone(Vision8Backbone):
    """FusionBench's ConvNeXt checkpoints: the trunk is merged, each task keeps its fine-tuned linear classifier."""

    def _checkpoint_resources(self, todo: set[str]) -> list[Resource]:
        resources = []
        if todo & {"config", "processor", "pretrained"}:
            resources.append(self._hf_resource("hf:pretrained", self.hf_pretrained, "pretrained"))
        for task in self.task_names:
            if task in todo or f"head:{task}" in todo:
                resources.append(self._hf_resource(f"ft:{task}", self.hf_finetuned.format(task=task), task))
        return resources

    def _convert(self, todo: set[str], found: dict[str, Any]) -> None:
        from transformers import ConvNextForImageClassification

        if "hf:pretrained" in found:
            model = _from_pretrained(ConvNextForImageClassification, found["hf:pretrained"])
            self._save_common(found["hf:pretrained"], model.config)
            state = {f"convnext.{k}": v for k, v in model.convnext.state_dict().items()}
            write_safetensors(self.root / "pretrained.safetensors", state, float32=True)
        encoder = self.build_encoder()  # every tensor is overwritten for each task (strict load)
        for task in tqdm([t for t in self.task_names if f"ft:{t}" in found], desc=f"{self.name}: converting", unit="task"):
            source = found[f"ft:{task}"]
            model = _from_pretrained(ConvNextForImageClassification, source)
            classes = len(CLASS_NAMES[task])
            if model.classifier.out_features != classes:
                raise CheckpointError(f"{source}: classifier has {model.classifier.out_features} outputs, {task} has {classes} classes")
            _clip.load_encoder_state(encoder, {f"convnext.{k}": v for k, v in model.convnext.state_dict().items()}, str(source))
            write_safetensors(self.root / f"{task}.safetensors", encoder.state_dict(), float32=True)
            write_safetensors(self.head_path(task), model.classifier.state_dict(), float32=True)

    def _encoder_from_config(self, config: dict[str, Any]) -> nn.Module:
        from transformers import ConvNextConfig

        return ConvNextEncoder(ConvNextConfig.from_dict(config))

    def head_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        return head


@register_backbone("convnext-base")
class ConvNextBase(ConvNextBackbone):
    name = "convnext-base"
    description = "ConvNeXt-Base (ImageNet-1k) fine-tuned on 8 vision tasks with linear heads (FusionBench HF checkpoints)"
    hf_pretrained = "facebook/convnext-base-224"
    hf_finetuned = "tanganke/convnext-base-224_{task}_sgd_batch-size-64_lr-0.01_steps-4000"
