"""CLIP pieces of the vision-8 suite: the image encoder that is merged, the open_clip ->
Hugging Face key mapping, and the zero-shot classification heads.

The encoder is the vision tower *with* its projection, as in the task-vectors setup
(Ilharco et al. 2023, mlfoundations/task_vectors: the merged ``ImageEncoder`` is
open_clip's ``visual``, projection included); its state dict has the key layout of
``transformers.CLIPVisionModelWithProjection`` (``vision_model.*`` and
``visual_projection.weight``).

Zero-shot head (CLIP paper; task_vectors ``src/heads.py``): per class, embed the class name
in every template with the text tower, L2-normalise each embedding, average, L2-normalise;
logits = logit_scale * normalize(image_features) @ W^T.

open_clip state dicts (task_vectors / EMR-Merging checkpoints) map onto the encoder as in
transformers' ``convert_clip_original_pytorch_to_hf.py``:

    open_clip key (prefix "visual.")                  -> CLIPVisionModelWithProjection key
    class_embedding                                   -> vision_model.embeddings.class_embedding
    positional_embedding                              -> vision_model.embeddings.position_embedding.weight
    conv1.weight                                      -> vision_model.embeddings.patch_embedding.weight
    ln_pre.* / ln_post.*                              -> vision_model.pre_layrnorm.* / vision_model.post_layernorm.*
    transformer.resblocks.N.ln_1.* / ln_2.*           -> vision_model.encoder.layers.N.layer_norm1.* / layer_norm2.*
    transformer.resblocks.N.attn.in_proj_weight|bias  -> split in 3 along dim 0: self_attn.q_proj, k_proj, v_proj
    transformer.resblocks.N.attn.out_proj.*           -> vision_model.encoder.layers.N.self_attn.out_proj.*
    transformer.resblocks.N.mlp.c_fc.* / c_proj.*     -> vision_model.encoder.layers.N.mlp.fc1.* / fc2.*
    proj (width x embed_dim)                          -> visual_projection.weight (transposed)
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from mergebench.pool import CheckpointError


class CLIPImageEncoder(nn.Module):
    """Vision tower + visual projection; ``forward(pixel_values)`` returns the projected image embedding."""

    def __init__(self, config):
        from transformers import CLIPVisionModelWithProjection

        super().__init__()
        model = CLIPVisionModelWithProjection(config)
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class ZeroShotHead(nn.Module):
    """logit_scale * normalize(x) @ W^T with fixed, L2-normalised class embeddings W."""

    def __init__(self, weight: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("logit_scale", logit_scale.reshape(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale * features @ self.weight.T


@torch.no_grad()
def zero_shot_weights(clip_model, tokenizer, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(classes, dim) class embeddings from the text tower of a ``transformers.CLIPModel``."""
    clip_model.eval()
    max_length = clip_model.config.text_config.max_position_embeddings
    texts = [template.format(c=name) for name in class_names for template in templates]
    embeddings = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pooled = clip_model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        embeddings.append(clip_model.text_projection(pooled))
    embedded = torch.cat(embeddings).float()
    embedded = embedded / embedded.norm(dim=-1, keepdim=True)
    per_class = embedded.reshape(len(class_names), len(templates), -1).mean(1)
    return per_class / per_class.norm(dim=-1, keepdim=True)


# --- open_clip state dicts ------------------------------------------------------------
# open_clip VisionTransformer key (after the leading "visual.") -> CLIPVisionModelWithProjection key
_OPEN_CLIP_NAMES = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")

PICKLED_MODULE_HELP = (
    "mergebench never unpickles code. If this is a whole pickled module (as the task_vectors / "
    "EMR-Merging checkpoints are), convert it once to a state dict on a machine where you trust the "
    "file and open_clip is installed:\n"
    "  python -c \"import torch, sys; m = torch.load(sys.argv[1], weights_only=False); "
    "torch.save(m.state_dict(), sys.argv[2])\" finetuned.pt finetuned_state.pt\n"
    "and put the state dict in its place (a .pt state dict or a .safetensors file). Or let mergebench "
    "do it: `mergebench prepare ... --allow-pickle` unpickles it (open_clip_torch installed; this runs "
    "code from the file) and keeps a safetensors copy in the cache."
)


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a .pt file read with ``weights_only=True``;
    a pickled module only with ``allow_pickle`` (``unpickled_state_dict``), else refused."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if allow_pickle:
            return unpickled_state_dict(path)
        raise CheckpointError(
            f"{path} is not a plain state dict: torch.load(weights_only=True) refused it, it holds pickled "
            f"objects. {PICKLED_MODULE_HELP}"
        ) from error
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a training checkpoint that wraps the state dict
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors. {PICKLED_MODULE_HELP}")
    return loaded


def unpickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint released as a pickled module (task_vectors' ``ImageEncoder``
    around an open_clip ``CLIP``, as EMR-Merging and T-Switch reuse them), read once with
    ``torch.load(weights_only=False)`` and kept as safetensors in the cache under the file's
    SHA-256, so later reads unpickle nothing. Unpickling runs code from the file: only on the
    user's ``--allow-pickle``, with a warning. The pickled classes must be importable:
    open_clip's from ``open_clip_torch``, task_vectors' own (``src.modeling``) from its checkout."""
    import warnings

    from safetensors.torch import load_file

    from mergebench.cache import cache_dir, write_safetensors
    from mergebench.filehash import file_sha256

    converted = cache_dir() / "unpickled" / f"{file_sha256(path)}.safetensors"
    if converted.is_file():
        return load_file(str(converted))
    warnings.warn(f"--allow-pickle: unpickling {path}, which runs code from the file; use it only on files you "
                  f"trust (its tensors are kept as {converted}, so this happens once)", stacklevel=2)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        raise CheckpointError(
            f"{path}: unpickling needs the module {error.name!r}, which is not installed: open_clip's classes come "
            "from open_clip_torch (pip install open_clip_torch), the task_vectors ImageEncoder from a checkout of "
            "mlfoundations/task_vectors on PYTHONPATH (its src.modeling)") from error
    if isinstance(loaded, nn.Module):
        state = loaded.state_dict()
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        state = loaded["state_dict"]
    else:
        state = loaded
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: unpickled a {type(loaded).__name__}, neither a torch module nor a state dict "
                              "of tensors")
    # clone: tensors sharing storage (tied weights) cannot be written to one safetensors file as views
    write_safetensors(converted, {key: value.detach().clone() for key, value in state.items()})
    return load_file(str(converted))


def open_clip_to_hf(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The visual tower of an open_clip state dict in CLIPVisionModelWithProjection's key layout.

    Accepts the keys of an open_clip ``CLIP`` (``visual.*``), of the task-vectors
    ``ImageEncoder`` (``model.visual.*``), and of ``nn.DataParallel`` (``module.``).
    Keys outside the visual tower (text tower, ``logit_scale``) are ignored."""
    visual = {}
    for key, value in state.items():
        stripped = key
        for prefix in ("module.", "model."):
            stripped = stripped.removeprefix(prefix)
        if stripped.startswith("visual."):
            visual[stripped.removeprefix("visual.")] = value
    if not visual:
        raise CheckpointError(f"{source}: no open_clip visual tower keys ('visual.*'); first keys: {sorted(state)[:5]}")
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in visual.items():
        if key in _OPEN_CLIP_NAMES:
            converted[_OPEN_CLIP_NAMES[key]] = value
        elif key == "proj":
            converted["visual_projection.weight"] = value.T.contiguous()
        elif match := _IN_PROJ.match(key):
            layer, kind = match.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"vision_model.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
        elif (match := _BLOCK.match(key)) and match.group(2) in _OPEN_CLIP_BLOCK:
            layer, name, kind = match.groups()
            converted[f"vision_model.encoder.layers.{layer}.{_OPEN_CLIP_BLOCK[name]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: open_clip keys with no counterpart in CLIPVisionModelWithProjection: "
            f"{', '.join('visual.' + k for k in sorted(unknown)[:8])} (only the OpenAI ViT layout is supported)"
        )
    return converted


def load_encoder_state(encoder: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load that names the checkpoint and the keys or shapes at fault."""
    ours = encoder.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys differ from the CLIP image encoder (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the encoder built from the pretrained "
                f"config has {tuple(ours[key].shape)}"
            )
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)

