"""The atomic writers of mergebench.cache that the suites' `prepare` steps share."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from mergebench.cache import update_json, write_safetensors


def test_update_json_creates_then_merges(tmp_path):
    path = tmp_path / "sub" / "sources.json"
    assert update_json(path, {"pretrained": "a", "cola": "b"}) == {"pretrained": "a", "cola": "b"}
    update_json(path, {"cola": "c", "rte": "d"})  # a later prepare: new keys added, old ones replaced
    assert json.loads(path.read_text()) == {"pretrained": "a", "cola": "c", "rte": "d"}
    assert [p.name for p in path.parent.iterdir()] == ["sources.json"]  # no temporary file left


def test_write_safetensors_casts_only_floating_tensors_when_asked(tmp_path):
    state = {"w": torch.ones(2, 3, dtype=torch.float16).t(), "ids": torch.arange(3)}  # .t(): not contiguous
    write_safetensors(tmp_path / "kept.safetensors", state)
    write_safetensors(tmp_path / "cast.safetensors", state, float32=True)
    kept, cast = load_file(str(tmp_path / "kept.safetensors")), load_file(str(tmp_path / "cast.safetensors"))
    assert kept["w"].dtype == torch.float16 and cast["w"].dtype == torch.float32
    assert kept["ids"].dtype == cast["ids"].dtype == torch.int64
    assert torch.equal(cast["w"], torch.ones(3, 2)) and torch.equal(cast["ids"], torch.arange(3))
