"""Shared fixtures: an isolated cache for the whole session and the tiny-bert
backbone prepared once (data, pretrained weights, three fine-tuned encoders)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebench.registry import BACKBONES


@pytest.fixture(scope="session", autouse=True)
def mergebench_cache(tmp_path_factory) -> Path:
    """``$MERGEBENCH_CACHE`` points at a session tmp dir, so no test reads or writes
    ``~/.cache/mergebench``; the previous value is restored at the end."""
    cache = tmp_path_factory.mktemp("mergebench-cache")
    previous = os.environ.get("MERGEBENCH_CACHE")
    os.environ["MERGEBENCH_CACHE"] = str(cache)
    try:
        yield cache
    finally:
        if previous is None:
            os.environ.pop("MERGEBENCH_CACHE", None)
        else:
            os.environ["MERGEBENCH_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_bert(mergebench_cache):
    """The tiny-bert backbone, prepared once per session inside the session cache."""
    backbone = BACKBONES.get("tiny-bert")()
    assert Path(backbone.root).is_relative_to(mergebench_cache), backbone.root
    backbone.prepare()
    return backbone


@pytest.fixture
def write_checkpoint(tmp_path) -> Callable[..., Path]:
    """Write a (possibly altered) copy of a state dict as a safetensors file in tmp_path.

    ``write_checkpoint(state, name, drop=[keys], replace={key: tensor})``
    """

    def write(state: dict[str, torch.Tensor], name: str, drop=(), replace=None) -> Path:
        altered = {k: v.clone() for k, v in state.items() if k not in set(drop)}
        altered.update(replace or {})
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in altered.items()}, str(path))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_bert_finetuned_state(tiny_bert) -> Callable[[str], dict[str, torch.Tensor]]:
    """The fine-tuned encoder state of one tiny task (fresh tensors on every call)."""

    def state(task: str) -> dict[str, torch.Tensor]:
        return load_file(str(tiny_bert.finetuned_checkpoint(task)))

    return state
