"""Which module type and which layer a parameter tensor belongs to, for the
sensitivity probes of Auto-FlexSwitch (arXiv 2604.28109, Sec. III-C, Exp I-II,
Fig. 4), which edit one module type across all layers, or one whole layer, at a time.

The names follow the Hugging Face BERT family (MiniLM, RoBERTa, the tiny BERT) and
CLIP's vision tower (``q_proj``, ``mlp.fc1``, ``layer_norm1``, ...). The paper keeps
the weight and the bias of a module apart; here the biases of all linear layers form
one ``bias`` group, so that a probe of the whole model stays within a small budget.
"""
from __future__ import annotations

import re

# (type, patterns) in the order they are tried; a tensor whose name matches none is "other".
TENSOR_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layernorm", ("layernorm", "layer_norm", "layrnorm", ".ln_")),
    ("embeddings", ("embedding", "class_embedding")),
    ("bias", (".bias",)),
    ("query", (".query.", ".q_proj.")),
    ("key", (".key.", ".k_proj.")),
    ("value", (".value.", ".v_proj.")),
    ("attn-out", ("attention.output.dense.", ".out_proj.")),
    ("ffn-in", ("intermediate.dense.", ".mlp.fc1.", ".c_fc.")),
    ("ffn-out", ("output.dense.", ".mlp.fc2.", ".c_proj.")),
)

_LAYER = re.compile(r"\.(?:layer|layers|resblocks|blocks|h)\.(\d+)\.")


def tensor_type(key: str) -> str:
    """The module type of a parameter name, e.g. ``query`` or ``ffn-in`` (``other`` if unknown)."""
    name = "." + key.lower()
    for label, patterns in TENSOR_TYPES:
        if any(pattern in name for pattern in patterns):
            return label
    return "other"


def tensor_layer(key: str) -> int | None:
    """The transformer block index of a parameter name (None outside the blocks)."""
    match = _LAYER.search("." + key)
    return int(match.group(1)) if match else None


def in_group(key: str, group: str) -> bool:
    """``group`` is ``type:<type>`` or ``layer:<index>``."""
    kind, _, value = group.partition(":")
    if kind == "type":
        return tensor_type(key) == value
    if kind == "layer":
        return tensor_layer(key) == int(value)
    raise ValueError(f"unknown tensor group {group!r}; expected 'type:<type>' or 'layer:<index>'")


def groups_of(keys: list[str]) -> list[str]:
    """The non-empty type groups (in TENSOR_TYPES order) and layer groups (in index order) of ``keys``."""
    types = {tensor_type(key) for key in keys}
    ordered = [f"type:{label}" for label, _ in TENSOR_TYPES if label in types]
    if "other" in types:
        ordered.append("type:other")
    layers = sorted({layer for key in keys if (layer := tensor_layer(key)) is not None})
    return ordered + [f"layer:{layer}" for layer in layers]
