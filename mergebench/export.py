"""Merged models taken out of mergebench: ``mergebench merge --out DIR`` and ``run
--save-merged DIR`` write one to a folder, :func:`load` reads it back.

The folder (``FORMAT`` 1):

* a static merge: the merged encoder as a folder its own library loads directly, i.e.
  transformers' ``save_pretrained`` of the Hugging Face model inside the encoder
  (``config.json`` + ``model.safetensors``: ``AutoModel.from_pretrained(DIR)``; the CLIP
  vision tower + projection as ``CLIPVisionModelWithProjection``), encoder tensors outside
  that model (DETR's box MLP) in ``encoder_extra.safetensors``, and an encoder with no
  Hugging Face model inside as its state dict in ``encoder.safetensors``;
* a dynamic merge: the pretrained encoder (``pretrained.safetensors``, the prepared
  checkpoint copied byte for byte, so its SHA-256 is the manifest's) and the method's
  checksummed containers (``artifacts/<name>``, what ``Merged.artifacts()`` stores and
  the run charged as storage);
* both: every task's head in ``heads.safetensors``, keys ``<task>.<parameter>`` (the
  head module's own state-dict names), the backbone's transformers tokenizer or image
  processor where it has one (``AutoTokenizer.from_pretrained(DIR)``), and ``mergebench.json``: method, resolved
  hyperparameters, seed, protocol, backbone, suite, tasks, how the encoder turns hidden
  states into features, the source checkpoints with their SHA-256 from the prepare
  manifest, the mergebench version, and the size and SHA-256 of every file written.

:func:`load` checks every file against ``mergebench.json`` and returns a
``torch.nn.Module``; dynamic models are rebuilt from their artifacts by the method's
``rebuild`` (nothing is unpickled). The backbone's code gives the modules' shapes (for
the GLUE and vision suites, its prepared config: ``mergebench prepare``); every weight
comes from the folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergebench.errors import CorruptArtifactError, HyperparameterError, MissingResourceError, NotApplicableError
from mergebench.filehash import file_sha256

FORMAT = 1
METADATA = "mergebench.json"
HEADS = "heads.safetensors"
PRETRAINED = "pretrained.safetensors"
ARTIFACTS = "artifacts"
ENCODER = "encoder.safetensors"
ENCODER_EXTRA = "encoder_extra.safetensors"


def mergebench_version() -> str:
    try:
        return version("mergebench")
    except PackageNotFoundError:
        from mergebench import __version__

        return __version__


# --- where -----------------------------------------------------------------------------------------
def check_out(out: Path | str, overwrite: bool, option: str = "--out") -> Path:
    """The folder to export into, checked before any work: a non-empty folder (or a file) is
    refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HyperparameterError(f"{option} {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HyperparameterError(f"{option} {out} is not empty; pass --overwrite to replace what it holds")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK) or (out.is_dir() and not os.access(out, os.W_OK)):
        raise HyperparameterError(f"{option} {out} cannot be written")
    return out


# --- the encoder as its library's model ----------------------------------------------------------
def library_model(encoder: nn.Module) -> tuple[nn.Module | None, str]:
    """(the transformers model inside ``encoder``, the prefix of its keys in the encoder's
    state dict), or (None, "") if there is none."""
    from transformers import PreTrainedModel

    if isinstance(encoder, PreTrainedModel):
        return encoder, ""
    vision, projection = getattr(encoder, "vision_model", None), getattr(encoder, "visual_projection", None)
    if vision is not None and projection is not None and hasattr(vision, "config"):  # the CLIP backbones
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(**{**vision.config.to_dict(), "projection_dim": projection.out_features})
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(config)
        model.vision_model, model.visual_projection = vision, projection  # the same names as the encoder's keys
        return model, ""
    for name, child in encoder.named_children():
        if isinstance(child, PreTrainedModel):
            return child, f"{name}."
    return None, ""


def write_encoder(encoder: nn.Module, folder: Path) -> dict[str, Any]:
    """The encoder's weights in ``folder`` (see the module docstring); what ``mergebench.json``
    says about them."""
    state = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()}
    model, prefix = library_model(encoder)
    if model is None:
        save_file(state, str(folder / ENCODER))
        return {"format": "state-dict", "file": ENCODER}
    model.save_pretrained(str(folder), safe_serialization=True)
    saved = {prefix + key for key in model.state_dict()}  # its own names: transformers may rename keys on disk
    extra = {key: value for key, value in state.items() if key not in saved}
    if extra:
        save_file(extra, str(folder / ENCODER_EXTRA))
    return {"format": "transformers", "class": type(model).__name__, "prefix": prefix,
            "extra": ENCODER_EXTRA if extra else None}


def library_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` folder under the model's own names, read by the
    transformers class ``name`` itself: transformers 5 renames some models' keys on disk (ViT's
    ``vit.layers.N.attention.q_proj`` is ``vit.encoder.layer.N.attention.attention.query`` in
    the file). Modules the export left out (a classifier replaced by the identity) are not read."""
    import transformers
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()  # the warning about the left-out classifier it initialises
    try:
        model, info = getattr(transformers, name).from_pretrained(str(folder), output_loading_info=True)
    finally:
        logging.set_verbosity(previous)
    missing = set(info["missing_keys"])
    return {key: value for key, value in model.state_dict().items() if key not in missing}


def read_encoder_state(folder: Path, description: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder state dict (the backbone's key names) of an exported static merge."""
    if description.get("format") == "state-dict":
        return load_file(str(folder / description["file"]))
    prefix = description.get("prefix", "")
    state = {prefix + key: value for key, value in library_weights(folder, description["class"]).items()}
    if description.get("extra"):
        state.update(load_file(str(folder / description["extra"])))
    return state


# --- writing ---------------------------------------------------------------------------------------
def export_merged(merged, method, pool, out: Path | str, *, overwrite: bool = False, protocol: str | None = None,
                  extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``merged`` (what ``method`` made of ``pool``) to ``out``. Written into a staging
    folder beside ``out`` and moved into place at the end, so a failure leaves no half folder."""
    from mergebench.method import StaticMerged

    out = check_out(out, overwrite)
    backbone = pool.backbone
    merged.to("cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        metadata: dict[str, Any] = {
            "format": FORMAT,
            "mergebench_version": mergebench_version(),
            "method": method.name,
            "kind": "static" if isinstance(merged, StaticMerged) else "dynamic",
            "hyperparameters": method.resolved_hyperparameters(backbone),
            "seed": method.seed,
            "protocol": protocol,
            "automatic": method.automatic,
            "backbone": backbone.name,
            "suite": backbone.suite,
            "tasks": list(pool.tasks),
            "features": _first_line(type(merged.encoder).__doc__),
            "sources": sources(pool),
            "checkpoint_manifest": pool.manifest_sha256,
            **dict(extra_metadata or {}),
        }
        if isinstance(merged, StaticMerged):
            metadata["encoder"] = write_encoder(merged.encoder, staging)
        else:
            shutil.copyfile(backbone.pretrained_checkpoint(), staging / PRETRAINED)
            (staging / ARTIFACTS).mkdir()
            for name, artifact in merged.artifacts().items():
                if Path(name).name != name or name.startswith("."):
                    raise ValueError(f"artifact name {name!r} is not a plain file name")
                if isinstance(artifact, Path):
                    shutil.copyfile(artifact, staging / ARTIFACTS / name)
                else:
                    (staging / ARTIFACTS / name).write_bytes(artifact)
            metadata["artifacts"] = sorted(merged.artifacts())
        for name in ("tokenizer", "processor"):  # what makes the inputs, where the backbone has one of transformers'
            maker = getattr(backbone, name, None)
            if hasattr(maker, "save_pretrained"):
                maker.save_pretrained(str(staging))
        heads = {f"{task}.{key}": value.detach().cpu().contiguous()
                 for task in pool.tasks for key, value in merged.head(task).state_dict().items()}
        save_file(heads, str(staging / HEADS))
        metadata["heads"] = {task: type(merged.head(task)).__name__ for task in pool.tasks}
        metadata["files"] = {path.relative_to(staging).as_posix(): {"size": path.stat().st_size,
                                                                    "sha256": file_sha256(path)}
                             for path in sorted(staging.rglob("*")) if path.is_file()}
        (staging / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def sources(pool) -> dict[str, Any]:
    """The pretrained and fine-tuned checkpoints the merge read, with their size and SHA-256
    (the prepare manifest's, where it lists them)."""
    def describe(path: Path) -> dict[str, Any]:
        entry = pool.manifest.entry(path) if pool.manifest is not None else None
        size, digest = (entry.size, entry.sha256) if entry is not None else (path.stat().st_size, file_sha256(path))
        return {"file": str(path), "size": size, "sha256": digest}

    return {"pretrained": describe(pool.backbone.pretrained_checkpoint()),
            "finetuned": {task: describe(pool.backbone.finetuned_checkpoint(task)) for task in pool.tasks}}


def check_exportable(method) -> None:
    """NotApplicableError, before any work, for a dynamic method that cannot rebuild its model
    from its artifacts (``individual``: the fine-tuned checkpoints themselves)."""
    from mergebench.method import Method

    if method.dynamic and type(method).rebuild is Method.rebuild:
        raise NotApplicableError(f"method {method.name!r} cannot be exported: its model cannot be rebuilt from "
                                 "stored artifacts")


def saver(plan, out: Path | str, overwrite: bool = False) -> Callable[..., Path]:
    """``(merged, pool) -> folder``: the export of a resolved run's merged model (``runner.execute``'s
    ``keep``); a method that cannot be exported is refused here, before any work."""
    check_exportable(plan.method)
    protocol = getattr(getattr(plan, "protocol", None), "name", None)
    extra = getattr(plan.backbone_class, "export_metadata", None)

    def save(merged, pool) -> Path:
        return export_merged(merged, plan.method, pool, out, overwrite=overwrite, protocol=protocol,
                             extra_metadata=extra() if extra else None)

    return save


def merge_and_export(plan, out: Path | str, overwrite: bool = False) -> Path:
    """``mergebench merge``: the run's stages up to the merge, then the export; nothing is
    evaluated or recorded."""
    from mergebench.runner import exemplars_for, load_pool, seed_everything, timed_merge

    check_exportable(plan.method)
    method = plan.method
    backbone = plan.make_backbone()
    tasks = plan.task_names(backbone)  # a protocol may leave tasks out (auto-flexswitch-2026: GLUE without STS-B)
    with load_pool(backbone, tasks) as pool:
        seed_everything(plan.seed)
        exemplars = exemplars_for(method, backbone, tasks, plan.seed)
        merged, _ = timed_merge(method, pool, exemplars)
    return saver(plan, out, overwrite)(merged, pool)


def _first_line(text: str | None) -> str | None:
    return " ".join(text.strip().split("\n\n")[0].split()) if text else None


# --- reading ---------------------------------------------------------------------------------------
class FolderPool:
    """What ``Method.rebuild`` reads of a pool, from an exported folder."""

    def __init__(self, backbone, tasks: list[str], pretrained: Path):
        self.backbone = backbone
        self.tasks = list(tasks)
        self._pretrained = pretrained

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self._pretrained))


class MergedModel(nn.Module):
    """An exported merged model. ``forward(task=..., **inputs)``: the task's head on the
    features of the merged encoder (a dynamic one composed per input by its router, or for
    the given task where the method needs the task identity). Without ``task``: the
    features, composed per input by the router of an automatic method; a method that needs
    the task identity refuses. ``route(**inputs)``: the (batch, K) composition weights over
    ``tasks``."""

    def __init__(self, merged, metadata: Mapping[str, Any]):
        super().__init__()
        self.merged = merged
        self.metadata = dict(metadata)
        self.tasks = tuple(metadata["tasks"])
        self.encoder = merged.encoder  # registered, so .parameters() and .eval() reach it
        self.heads = nn.ModuleList([merged.head(task) for task in self.tasks])

    def forward(self, task: str | None = None, **inputs: Any) -> torch.Tensor:
        from mergebench.dynamic import RoutedMerged

        if task is not None:
            if task not in self.tasks:
                raise KeyError(f"no task {task!r}; tasks: {', '.join(self.tasks)}")
            return self.merged.predict(task, inputs)
        if not isinstance(self.merged, RoutedMerged):
            with torch.no_grad():
                return self.merged.encoder(**inputs)
        if self.merged.router is None:
            raise HyperparameterError(f"method {self.metadata['method']!r} needs the task identity: "
                                      f"call the model with task= one of {', '.join(self.tasks)}")
        return self.merged.features(inputs, self.merged.route(inputs))

    @torch.no_grad()
    def route(self, **inputs: Any) -> torch.Tensor:
        from mergebench.dynamic import RoutedMerged

        if not isinstance(self.merged, RoutedMerged) or self.merged.router is None:
            raise HyperparameterError(f"method {self.metadata['method']!r} does not route per input")
        return self.merged.route(inputs)

    def to(self, device: torch.device | str) -> "MergedModel":  # type: ignore[override]
        self.merged.to(device)
        return self


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not path.is_file():
        raise MissingResourceError(f"{folder} holds no exported merged model: {METADATA} is missing "
                                   "(write one with `mergebench merge --out` or `run --save-merged`)")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptArtifactError(f"{path}: not JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CorruptArtifactError(f"{path}: format {metadata.get('format') if isinstance(metadata, dict) else None!r}, "
                                   f"this mergebench reads format {FORMAT}")
    return metadata


def verify_files(folder: Path, metadata: Mapping[str, Any]) -> None:
    """CorruptArtifactError naming the first file that is missing or differs from its recorded size or SHA-256."""
    for name, entry in metadata.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CorruptArtifactError(f"{path} is missing; {METADATA} lists it")
        if path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            raise CorruptArtifactError(f"{path} differs from the size and SHA-256 {METADATA} records "
                                       "(changed or truncated since it was exported)")


def load(folder: Path | str, *, checkpoint_dir: Path | str | None = None,
         data_dir: Path | str | None = None) -> MergedModel:
    """The merged model exported in ``folder``, every file checked against its metadata."""
    from mergebench.method import StaticMerged
    from mergebench.registry import BACKBONES
    from mergebench.runner import make_method

    folder = Path(folder)
    metadata = read_metadata(folder)
    verify_files(folder, metadata)
    if metadata.get("suite_config"):
        from mergebench.suite_config import register_embedded

        register_embedded(metadata["suite_config"])
    backbone = BACKBONES.get(metadata["backbone"])(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
    tasks = list(metadata["tasks"])
    if metadata["kind"] == "static":
        merged = StaticMerged(backbone, read_encoder_state(folder, metadata["encoder"]))
    else:
        method = make_method(metadata["method"], metadata["hyperparameters"], metadata.get("seed", 0))
        artifacts = {name: (folder / ARTIFACTS / name).read_bytes() for name in metadata["artifacts"]}
        merged = method.rebuild(FolderPool(backbone, tasks, folder / PRETRAINED), artifacts)
    stored = load_file(str(folder / HEADS))
    heads = {}
    for task in tasks:
        head = backbone.task(task).head()
        head.load_state_dict({key[len(task) + 1:]: value for key, value in stored.items()
                              if key.startswith(f"{task}.")}, strict=True)
        heads[task] = head.eval()
    merged.use_heads(heads)
    return MergedModel(merged, metadata)
