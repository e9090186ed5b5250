"""Exported merged models: a static merge read back by plain transformers gives the logits and
metrics of the run; a dynamic one read back by ``mergebench.load`` the run's predictions;
bad folders and options are refused."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mergebench
from mergebench.cli import main
from mergebench.errors import CorruptArtifactError, HyperparameterError
from mergebench.export import saver
from mergebench.runner import execute, resolve


def run_and_save(method: str, out, **hyperparameters):
    """The run's Result and Merged object, the merged model exported to ``out`` after evaluating."""
    plan = resolve(method, "tiny-bert", hyperparameters=hyperparameters)
    kept = {}
    save = saver(plan, out)

    def keep(merged, pool):
        kept["merged"] = merged
        save(merged, pool)

    result = execute(plan, keep=keep)
    return result, kept["merged"]


def test_a_static_merge_loads_with_plain_transformers(tiny_bert, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "ta"
    result, merged = run_and_save("task-arithmetic", out, scaling=0.4)
    model = AutoModel.from_pretrained(str(out)).eval()
    heads = load_file(str(out / "heads.safetensors"))
    metadata = json.loads((out / "mergebench.json").read_text())
    assert metadata["kind"] == "static" and metadata["hyperparameters"]["scaling"] == 0.4
    for task in tiny_bert.task_names:
        predictions, labels = [], []
        for inputs, targets in tiny_bert.task(task).batches("test", 32):
            with torch.no_grad():
                hidden = model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            features = (hidden * mask).sum(1) / mask.sum(1)  # the backbone's mean pooling, written out here
            logits = features @ heads[f"{task}.weight"].T + heads[f"{task}.bias"]
            torch.testing.assert_close(logits, merged.predict(task, inputs), rtol=1e-5, atol=1e-5)
            predictions.append(logits.argmax(1).numpy())
            labels.append(targets.numpy())
        accuracy = float(np.mean(np.concatenate(predictions) == np.concatenate(labels)))
        assert accuracy == pytest.approx(result.metrics[task], abs=1e-9)


def test_the_metadata_names_the_sources_with_their_hashes(tiny_bert, tmp_path):
    out = tmp_path / "avg"
    assert main(["merge", "--method", "weight-averaging", "--backbone", "tiny-bert", "--out", str(out)]) == 0
    metadata = json.loads((out / "mergebench.json").read_text())
    assert metadata["method"] == "weight-averaging" and metadata["backbone"] == "tiny-bert"
    assert metadata["protocol"] == "original"
    assert metadata["mergebench_version"] == mergebench.__version__
    checkpoints = {"pretrained": tiny_bert.pretrained_checkpoint(),
                   **{task: tiny_bert.finetuned_checkpoint(task) for task in tiny_bert.task_names}}
    sources = {"pretrained": metadata["sources"]["pretrained"], **metadata["sources"]["finetuned"]}
    for name, path in checkpoints.items():
        assert sources[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for name, entry in metadata["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()


def test_t_switch_reloads_with_the_task_identity(tiny_bert, tmp_path):
    out = tmp_path / "ts"
    _, merged = run_and_save("t-switch", out, alpha=0.7)
    loaded = mergebench.load(out)
    assert isinstance(loaded, torch.nn.Module) and sorted(p.name for p in (out / "artifacts").iterdir()) == \
        sorted(f"{task}.tswitch" for task in tiny_bert.task_names)
    for task in tiny_bert.task_names:
        inputs, _ = next(iter(tiny_bert.task(task).batches("test", 48)))
        expected = merged.predict(task, inputs)
        assert torch.equal(loaded(task=task, **inputs), expected)
    with pytest.raises(HyperparameterError, match="needs the task identity"):
        loaded(**inputs)


@pytest.mark.parametrize("method, hyperparameters", [
    ("auto-switch", {"exemplars": 12, "neighbours": 5}),
    ("twin-merging", {"exemplars": 12, "scope": "linear"}),
    ("auto-flexswitch", {"exemplars": 12, "steps": 5, "batch_size": 8, "centres": 3, "neighbours": 3,
                         "metric_epochs": 5}),
])
def test_an_automatic_method_reloads_and_routes_each_input(tiny_bert, tmp_path, method, hyperparameters):
    out = tmp_path / method
    _, merged = run_and_save(method, out, **hyperparameters)
    loaded = mergebench.load(out)
    mixed = [next(iter(tiny_bert.task(task).batches("test", 16)))[0] for task in tiny_bert.task_names]
    width = max(batch["input_ids"].shape[1] for batch in mixed)
    inputs = {key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) for b in mixed])
              for key in ("input_ids", "attention_mask")}  # inputs of every task in one batch
    weights = loaded.route(**inputs)
    torch.testing.assert_close(weights, merged.route(inputs), rtol=0, atol=0)
    assert len(torch.unique(weights.argmax(1))) > 1  # the batch really is routed to several tasks
    torch.testing.assert_close(loaded(**inputs), merged.features(inputs, merged.route(inputs)), rtol=1e-6, atol=1e-6)
    for task in tiny_bert.task_names:
        torch.testing.assert_close(loaded(task=task, **inputs), merged.predict(task, inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method, hyperparameters", [
    ("emr-merging", {}),
    ("flexswitch", {"exemplars": 12, "steps": 5, "batch_size": 8}),
])
def test_a_task_conditioned_method_reloads(tiny_bert, tmp_path, method, hyperparameters):
    out = tmp_path / method
    _, merged = run_and_save(method, out, **hyperparameters)
    loaded = mergebench.load(out)
    for task in tiny_bert.task_names:
        inputs, _ = next(iter(tiny_bert.task(task).batches("test", 32)))
        assert torch.equal(loaded(task=task, **inputs), merged.predict(task, inputs))


def test_a_changed_file_is_refused(tiny_bert, tmp_path):
    out = tmp_path / "ts"
    assert main(["merge", "--method", "t-switch", "--backbone", "tiny-bert", "--out", str(out)]) == 0
    artifact = out / "artifacts" / "markers-b.tswitch"
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 1
    artifact.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="markers-b.tswitch"):
        mergebench.load(out)


def test_merge_refuses_a_non_empty_folder_unless_overwrite(tiny_bert, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    command = ["merge", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--out", str(out)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"--out {out} is not empty" in error and "--overwrite" in error
    assert (out / "notes.txt").read_text() == "mine"
    assert main([*command, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "heads.safetensors", "mergebench.json",
                                                      "model.safetensors"]


def test_run_save_merged_writes_after_evaluating(tiny_bert, tmp_path, capsys):
    out = tmp_path / "saved"
    assert main(["run", "--method", "ties", "--backbone", "tiny-bert", "--no-save", "--save-merged", str(out)]) == 0
    assert json.loads((out / "mergebench.json").read_text())["method"] == "ties"
    assert main(["run", "--method", "ties,task-arithmetic", "--backbone", "tiny-bert", "--no-save",
                 "--save-merged", str(tmp_path / "two")]) == 2
    assert "--save-merged takes one method" in capsys.readouterr().err
    assert not (tmp_path / "two").exists()


def test_load_of_a_folder_without_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="mergebench.json is missing"):
        mergebench.load(tmp_path)


def test_a_clip_encoder_is_written_as_clip_vision_model_with_projection(tmp_path):
    """The CLIP backbones' encoder (vision tower + projection) loads back as transformers'
    CLIPVisionModelWithProjection, whose image_embeds are the encoder's features."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from mergebench.export import read_encoder_state, write_encoder
    from mergebench.tasks._clip import CLIPImageEncoder

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=8)
    encoder = CLIPImageEncoder(config).eval()
    description = write_encoder(encoder, tmp_path)
    pixels = torch.randn(3, 3, 32, 32)
    loaded = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).image_embeds, encoder(pixels))
    state = read_encoder_state(tmp_path, description)
    assert set(state) == set(encoder.state_dict())
    assert all(torch.equal(state[key], value) for key, value in encoder.state_dict().items())


def test_encoder_tensors_outside_the_transformers_model_go_beside_it(tmp_path):
    """DETR's pattern: a transformers model plus a module of the encoder's own (its box MLP)."""
    from transformers import BertConfig, BertModel

    from mergebench.export import ENCODER_EXTRA, read_encoder_state, write_encoder

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=16), add_pooling_layer=False)
            self.box = torch.nn.Linear(8, 4)

    body = Body()
    description = write_encoder(body, tmp_path)
    assert description["prefix"] == "model." and set(load_file(str(tmp_path / ENCODER_EXTRA))) == {"box.weight",
                                                                                                    "box.bias"}
    state = read_encoder_state(tmp_path, description)
    assert set(state) == set(body.state_dict())
    assert all(torch.equal(state[key], value) for key, value in body.state_dict().items())


def test_a_method_that_cannot_be_rebuilt_is_refused_before_any_work(tiny_bert, tmp_path, capsys):
    out = tmp_path / "individual"
    assert main(["merge", "--method", "individual", "--backbone", "tiny-bert", "--out", str(out)]) == 2
    assert "method 'individual' cannot be exported" in capsys.readouterr().err and not out.exists()
