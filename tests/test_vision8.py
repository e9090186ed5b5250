"""The vision-8 suite on tiny files in the real formats: a 2-layer CLIP saved as the hub's
CLIPModel / CLIPVisionModel folders, the same weights as task_vectors-style open_clip state
dicts, a tiny ConvNeXt, and tiny image datasets (save_to_disk and hub parquet layouts).
Everything short of the download runs for real: location, conversion, zero-shot heads,
exemplars, evaluation and `mergebench run`."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

datasets = pytest.importorskip("datasets")
PIL_Image = pytest.importorskip("PIL.Image")

import huggingface_hub.constants  # noqa: E402  (after the skips: a dependency of datasets)
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
)

from mergebench.errors import MissingResourceError  # noqa: E402
from mergebench.cli import main  # noqa: E402
from mergebench.pool import CheckpointError, ModelPool  # noqa: E402
from mergebench.registry import BACKBONES  # noqa: E402
from mergebench.runner import run  # noqa: E402
from mergebench.tasks import _clip, _hub  # noqa: E402
from mergebench.tasks._vision8_prompts import CLASS_NAMES, TEMPLATES  # noqa: E402
from mergebench.tasks.vision8 import CLIPViTB32, ConvNextBase  # noqa: E402

TASKS = ("mnist", "eurosat", "svhn")  # ten classes each
LAYERS = 2


class TinyCLIP(CLIPViTB32):
    """clip-vit-b32 restricted to three tasks (same hub ids and layouts)."""

    name = "clip-tiny-test"
    task_names = TASKS


class TinyConvNext(ConvNextBase):
    name = "convnext-tiny-test"
    task_names = ("mnist", "eurosat")


# --- tiny files in the real formats --------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: the vocabulary of a BPE tokenizer with no merges."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = keep[:], 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def write_tokenizer(folder: Path) -> int:
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def write_pretrained_clip(folder: Path) -> CLIPModel:
    """openai/clip-vit-base-patch32 in miniature: CLIPModel + tokenizer + image processor."""
    folder.mkdir(parents=True)
    vocab = write_tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def finetuned_tower(pretrained: CLIPModel, seed: int) -> dict[str, torch.Tensor]:
    """A "fine-tuned" vision tower: pretrained + a seeded perturbation (keys without prefix)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in pretrained.vision_model.state_dict().items()}


def write_hub_vision_model(folder: Path, pretrained: CLIPModel, tower: dict[str, torch.Tensor]) -> None:
    """A tanganke/clip-vit-base-patch32_<task> folder: CLIPVisionModel config and the hub's key layout."""
    folder.mkdir(parents=True)
    config = pretrained.config.vision_config.to_dict()
    config.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"])
    (folder / "config.json").write_text(json.dumps(config))
    save_file({f"vision_model.{k}": v.contiguous() for k, v in tower.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def to_open_clip(tower: dict[str, torch.Tensor], projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """The task_vectors ImageEncoder state dict (open_clip key names under "model.visual.")."""
    out = {
        "class_embedding": tower["embeddings.class_embedding"],
        "positional_embedding": tower["embeddings.position_embedding.weight"],
        "conv1.weight": tower["embeddings.patch_embedding.weight"],
        "ln_pre.weight": tower["pre_layrnorm.weight"], "ln_pre.bias": tower["pre_layrnorm.bias"],
        "ln_post.weight": tower["post_layernorm.weight"], "ln_post.bias": tower["post_layernorm.bias"],
        "proj": projection.T,
    }
    for i in range(LAYERS):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{kind}"] = torch.cat([tower[ours + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[theirs + f"{a}.{kind}"] = tower[ours + f"{b}.{kind}"]
    state = {f"model.visual.{k}": v.contiguous() for k, v in out.items()}
    state["model.logit_scale"] = torch.tensor(4.6)  # the rest of open_clip's CLIP is ignored
    state["model.token_embedding.weight"] = torch.zeros(3, 4)
    return state


def open_clip_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer.forward (OpenAI ViT: QuickGELU, pre-LN blocks) on a state dict."""
    v = {k.removeprefix("model.visual."): t for k, t in state.items() if k.startswith("model.visual.")}
    width = v["class_embedding"].shape[0]
    x = nn.functional.conv2d(pixels, v["conv1.weight"], stride=v["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(x.shape[0], 1, width), x], 1) + v["positional_embedding"]
    x = nn.functional.layer_norm(x, (width,), v["ln_pre.weight"], v["ln_pre.bias"])
    for i in range(LAYERS):
        b = {k.removeprefix(f"transformer.resblocks.{i}."): t for k, t in v.items() if k.startswith(f"transformer.resblocks.{i}.")}
        attention = nn.MultiheadAttention(width, 2, batch_first=True)
        attention.load_state_dict({"in_proj_weight": b["attn.in_proj_weight"], "in_proj_bias": b["attn.in_proj_bias"],
                                   "out_proj.weight": b["attn.out_proj.weight"], "out_proj.bias": b["attn.out_proj.bias"]})
        h = nn.functional.layer_norm(x, (width,), b["ln_1.weight"], b["ln_1.bias"])
        x = x + attention(h, h, h, need_weights=False)[0]
        h = nn.functional.linear(nn.functional.layer_norm(x, (width,), b["ln_2.weight"], b["ln_2.bias"]), b["mlp.c_fc.weight"], b["mlp.c_fc.bias"])
        x = x + nn.functional.linear(h * torch.sigmoid(1.702 * h), b["mlp.c_proj.weight"], b["mlp.c_proj.bias"])
    return nn.functional.layer_norm(x[:, 0], (width,), v["ln_post.weight"], v["ln_post.bias"]) @ v["proj"]


def image_dataset(seed: int, n: int, mode: str = "RGB"):
    rng = np.random.default_rng(seed)
    shape = (20, 24) if mode == "L" else (20, 24, 3)
    images = [PIL_Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, 4, n).tolist()}, features=features)


@pytest.fixture(scope="module")
def hub_isolation(tmp_path_factory):
    """No network and an empty hub cache, so only the files written here are found."""
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
        patch.setitem(BACKBONES._items, TinyCLIP.name, TinyCLIP)
        patch.setitem(BACKBONES._items, TinyConvNext.name, TinyConvNext)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory, hub_isolation):
    root = tmp_path_factory.mktemp("vision8")
    hf, oc, data = root / "hf", root / "open_clip", root / "data"
    pretrained = write_pretrained_clip(hf / "openai" / "clip-vit-base-patch32")
    towers = {task: finetuned_tower(pretrained, seed) for seed, task in enumerate(TASKS, 1)}
    write_hub_vision_model(hf / "tanganke" / "clip-vit-base-patch32_mnist", pretrained, towers["mnist"])
    write_hub_vision_model(hf / "tanganke" / "clip-vit-base-patch32_eurosat", pretrained, towers["eurosat"])
    write_hub_vision_model(hf / "svhn", pretrained, towers["svhn"])  # the DIR/<task>/ layout

    write_pretrained_clip(oc / "openai" / "clip-vit-base-patch32")  # same seed: the same weights
    projection = pretrained.visual_projection.weight.detach()
    arch = oc / "ViT-B-32"
    arch.mkdir()
    torch.save(to_open_clip(pretrained.vision_model.state_dict(), projection), arch / "zeroshot.pt")
    for task, folder in (("mnist", "MNIST"), ("eurosat", "EuroSAT"), ("svhn", "SVHNVal")):
        (arch / folder).mkdir()
        state = to_open_clip(towers[task], projection)
        if task == "eurosat":
            save_file(state, str(arch / folder / "finetuned.safetensors"))
        else:
            torch.save(state, arch / folder / "finetuned.pt")

    for task, mode in (("mnist", "L"), ("eurosat", "RGB")):
        datasets.DatasetDict({"train": image_dataset(1, 12, mode), "test": image_dataset(2, 8, mode)}).save_to_disk(str(data / task))
    svhn = data / "ufldl-stanford" / "svhn" / "cropped_digits"  # the hub repository's parquet layout
    svhn.mkdir(parents=True)
    image_dataset(3, 12).to_parquet(str(svhn / "train-00000-of-00001.parquet"))
    image_dataset(4, 8).to_parquet(str(svhn / "test-00000-of-00001.parquet"))
    image_dataset(6, 2).to_parquet(str(svhn / "test_contrast-00000-of-00001.parquet"))
    (svhn.parent / "full_numbers").mkdir()
    image_dataset(5, 3).to_parquet(str(svhn.parent / "full_numbers" / "test-00000-of-00001.parquet"))
    return {"hf": hf, "open_clip": oc, "data": data, "pretrained": pretrained, "towers": towers}


@pytest.fixture(scope="module")
def hf_backbone(files):
    backbone = TinyCLIP(checkpoint_dir=files["hf"], data_dir=files["data"])
    backbone.prepare()
    return backbone


@pytest.fixture(scope="module")
def open_clip_backbone(files):
    backbone = TinyCLIP(checkpoint_dir=files["open_clip"], data_dir=files["data"])
    backbone.prepare()
    return backbone


def reference_encoder(pretrained: CLIPModel, tower: dict[str, torch.Tensor] | None = None):
    """The original model's image features: CLIP vision tower (optionally fine-tuned) + projection."""
    model = CLIPModel(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict())
    if tower is not None:
        model.vision_model.load_state_dict(tower)

    def encode(pixel_values):
        with torch.no_grad():
            return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)

    return encode


def accuracy_with(backbone, task: str, encode) -> float:
    head = backbone.task(task).head()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in backbone.task(task).batches("test", 3):
            correct += int((head(encode(inputs["pixel_values"])).argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


# --- tests ------------------------------------------------------------------------------------
def test_list_shows_the_vision8_backbones_and_suite():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list"]) == 0
    text = out.getvalue()
    for name in ("clip-vit-b32", "clip-vit-l14", "convnext-base"):
        assert name in text
    assert any(line.startswith("vision-8") and "clip-vit-b32" in line for line in text.splitlines())


def test_offline_prepare_and_run_fail_within_seconds_naming_what_is_missing(hub_isolation, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (["prepare"], ["run", "--method", "task-arithmetic", "--results-dir", str(tmp_path / "results")]):
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err):
            code = main([*command, "--backbone", "clip-vit-b32", "--checkpoint-dir", str(empty), "--data-dir", str(empty)])
        assert code == 2
        assert time.perf_counter() - start < 10
        message = err.getvalue()
        for item in ("openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_dtd", "tanganke/sun397",
                     "ufldl-stanford/svhn", "HF_HUB_OFFLINE", "--checkpoint-dir", "--data-dir", "zeroshot.pt"):
            assert item in message, item
    assert not (tmp_path / "results").exists()  # no record, not even an empty file


def test_unreachable_hub_is_detected_quickly_without_the_offline_flag(hub_isolation, monkeypatch, tmp_path):
    for variable in (*_hub.OFFLINE_VARIABLES, *_hub.PROXY_VARIABLES):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    _hub.probe.cache_clear()  # the real probe, not a remembered answer
    start = time.perf_counter()
    with pytest.raises(MissingResourceError, match=r"no connection to hub\.invalid:443"):
        CLIPViTB32(checkpoint_dir=tmp_path, data_dir=tmp_path).prepare()
    assert time.perf_counter() - start < 10


def test_huggingface_family_converts_to_encoder_state_dicts(files, hf_backbone):
    assert hf_backbone.checkpoint_family == "huggingface"
    pretrained, towers = files["pretrained"], files["towers"]
    with ModelPool(hf_backbone) as pool:
        key = "vision_model.encoder.layers.1.mlp.fc1.weight"
        expected = towers["svhn"]["encoder.layers.1.mlp.fc1.weight"] - pretrained.vision_model.state_dict()["encoder.layers.1.mlp.fc1.weight"]
        assert torch.equal(pool.task_vector("svhn", key), expected)
        # FusionBench's fine-tuned models are vision towers: the projection is the pretrained one
        assert torch.count_nonzero(pool.task_vector("mnist", "visual_projection.weight")) == 0
        assert "visual_projection.weight" in pool.merged_keys
    pixels = next(hf_backbone.task("eurosat").batches("test", 4))[0]["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32)
    encoder = hf_backbone.build_encoder().eval()
    encoder.load_state_dict(load_file(str(hf_backbone.finetuned_checkpoint("eurosat"))))
    with torch.no_grad():
        assert torch.allclose(encoder(pixels), reference_encoder(pretrained, towers["eurosat"])(pixels), atol=1e-5)
    sources = json.loads((hf_backbone.root / "sources.json").read_text())
    assert sources["family"] == "huggingface" and sources["ft:svhn"] == str(files["hf"] / "svhn")


def test_zero_shot_head_averages_normalised_template_embeddings(files, hf_backbone):
    pretrained = files["pretrained"]
    tokenizer = AutoTokenizer.from_pretrained(str(files["hf"] / "openai" / "clip-vit-base-patch32"))
    head = hf_backbone.task("eurosat").head()
    assert head.weight.shape == (10, 16)
    class_name = CLASS_NAMES["eurosat"][3]
    with torch.no_grad():
        tokens = tokenizer([t.format(c=class_name) for t in TEMPLATES["eurosat"]], padding=True, return_tensors="pt")
        text = pretrained.get_text_features(**tokens)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        text = text / text.norm(dim=-1, keepdim=True)
        expected = text.mean(0) / text.mean(0).norm()
        assert torch.allclose(head.weight[3], expected, atol=1e-5)
        features = torch.randn(5, 16)
        scale = pretrained.logit_scale.exp()
        assert torch.allclose(head(features), scale * (features / features.norm(dim=-1, keepdim=True)) @ head.weight.T, atol=1e-4)


def test_open_clip_family_matches_the_open_clip_forward_and_the_hub_weights(files, hf_backbone, open_clip_backbone):
    assert open_clip_backbone.checkpoint_family == "open_clip"
    assert open_clip_backbone.root != hf_backbone.root
    for name in ("pretrained.safetensors", "mnist.safetensors", "eurosat.safetensors", "svhn.safetensors"):
        ours, theirs = load_file(str(open_clip_backbone.root / name)), load_file(str(hf_backbone.root / name))
        if name != "pretrained.safetensors":  # open_clip fine-tuning also moves the projection; here it is the pretrained one
            assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.allclose(ours[key], theirs[key]), (name, key)
    # the mapping against open_clip's own computation, not against its inverse
    state = torch.load(files["open_clip"] / "ViT-B-32" / "MNIST" / "finetuned.pt", weights_only=True)
    encoder = open_clip_backbone.build_encoder().eval()
    encoder.load_state_dict(load_file(str(open_clip_backbone.finetuned_checkpoint("mnist"))))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(pixels), open_clip_forward(state, pixels), atol=1e-4)


def test_pickled_modules_and_foreign_keys_are_refused_with_instructions(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"(?s)module.pt is not a plain state dict.*never unpickles.*m.state_dict\(\)"):
        _clip.read_state_dict(tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="visual.trunk.stem"):
        _clip.open_clip_to_hf({"visual.trunk.stem.weight": torch.zeros(1)}, "convnext.pt")
    with pytest.raises(CheckpointError, match="no open_clip visual tower"):
        _clip.open_clip_to_hf({"text.weight": torch.zeros(1)}, "text.pt")


def test_exemplars_are_seeded_label_free_train_samples(hf_backbone):
    mnist = hf_backbone.task("mnist")
    first = mnist.exemplars(5, seed=0)
    assert set(first) == {"pixel_values"} and first["pixel_values"].shape == (5, 3, 32, 32)
    assert torch.equal(first["pixel_values"], mnist.exemplars(5, seed=0)["pixel_values"])
    assert not torch.equal(first["pixel_values"], mnist.exemplars(5, seed=1)["pixel_values"])
    with pytest.raises(ValueError, match="13 exemplars asked, the split has 12"):
        mnist.exemplars(13, seed=0)


def test_svhn_reads_only_its_configuration_from_the_parquet_layout(hf_backbone):
    assert len(hf_backbone.dataset("svhn", "test")) == 8  # neither full_numbers nor test_contrast
    assert len(hf_backbone.dataset("svhn", "train")) == 12


def test_runs_evaluate_each_task_with_the_right_weights(files, hf_backbone, tmp_path):
    """Individual: each task with its own fine-tuned tower; task arithmetic: pre + 0.3 * sum of task vectors."""
    pretrained, towers = files["pretrained"], files["towers"]
    locations = {"checkpoint_dir": files["hf"], "data_dir": files["data"], "results_dir": tmp_path, "batch_size": 5}
    individual = run("individual", TinyCLIP.name, **locations)
    assert individual.checkpoint_family == "huggingface"
    for task in TASKS:
        assert individual.metrics[task] == pytest.approx(accuracy_with(hf_backbone, task, reference_encoder(pretrained, towers[task])))
    base = pretrained.vision_model.state_dict()
    merged = {k: base[k] + 0.3 * sum(towers[t][k] - base[k] for t in TASKS) for k in base}
    arithmetic = run("task-arithmetic", TinyCLIP.name, **locations)
    for task in TASKS:
        assert arithmetic.metrics[task] == pytest.approx(accuracy_with(hf_backbone, task, reference_encoder(pretrained, merged)))
    records = [json.loads(line) for line in (tmp_path / f"{TinyCLIP.name}.jsonl").read_text().splitlines()]
    assert [r["checkpoint_family"] for r in records] == ["huggingface", "huggingface"]


def test_mergebench_run_command_with_static_dynamic_and_exemplar_methods(files, hf_backbone, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    argv = ["run", "--method", "task-arithmetic,t-switch,auto-switch", "--backbone", TinyCLIP.name,
            "--checkpoint-dir", str(files["hf"]), "--data-dir", str(files["data"]), "--results-dir", str(tmp_path),
            "--hp", "exemplars=4", "--hp", "neighbours=2"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 0, err.getvalue()
    records = {r["method"]: r for r in map(json.loads, (tmp_path / f"{TinyCLIP.name}.jsonl").read_text().splitlines())}
    assert set(records) == {"task-arithmetic", "t-switch", "auto-switch"}
    for record in records.values():
        assert list(record["metrics"]) == list(TASKS)
        assert all(0.0 <= value <= 1.0 for value in record["metrics"].values())
        assert record["checkpoint_family"] == "huggingface"
    assert records["t-switch"]["extra_storage_bytes"] > 0 and records["task-arithmetic"]["extra_storage_bytes"] == 0
    assert records["auto-switch"]["exemplars_per_task"] == 4
    assert "huggingface checkpoints" in err.getvalue()
    board = tmp_path / "board.md"
    assert main(["leaderboard", "--results-dir", str(tmp_path), "--output", str(board)]) == 0
    assert f"## {TinyCLIP.name} (suite: vision-8, checkpoints: huggingface)" in board.read_text()


def test_convnext_backbone_merges_the_trunk_and_keeps_each_fine_tuned_classifier(files, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=1000)
    pretrained = ConvNextForImageClassification(config).eval()
    pretrained.save_pretrained(checkpoints / "facebook" / "convnext-base-224")
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(checkpoints / "facebook" / "convnext-base-224")
    finetuned = {}
    for task in TinyConvNext.task_names:
        model = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=10)).eval()
        model.convnext.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in pretrained.convnext.state_dict().items()})
        model.save_pretrained(checkpoints / task)
        finetuned[task] = model
    result = run("individual", TinyConvNext.name, checkpoint_dir=checkpoints, data_dir=files["data"], results_dir=None, batch_size=4)
    backbone = TinyConvNext(checkpoint_dir=checkpoints, data_dir=files["data"])
    for task, model in finetuned.items():
        assert torch.equal(backbone.task(task).head().weight, model.classifier.weight)
        expected = accuracy_with(backbone, task, lambda pixels, model=model: model.convnext(pixel_values=pixels).pooler_output)
        assert result.metrics[task] == pytest.approx(expected)
    with ModelPool(backbone) as pool:
        key = "convnext.encoder.stages.1.layers.0.pwconv1.weight"
        assert torch.allclose(pool.task_vector("mnist", key), finetuned["mnist"].state_dict()[key] - pretrained.state_dict()[key])


def test_bad_labels_are_reported_with_the_file(files, tmp_path):
    data = tmp_path / "data"
    bad = image_dataset(1, 4).cast_column("label", datasets.Value("int64")).map(lambda row: {"label": 12})
    datasets.DatasetDict({"train": bad, "test": bad}).save_to_disk(str(data / "mnist"))
    backbone = TinyCLIP(checkpoint_dir=files["hf"], data_dir=data)
    with pytest.raises(ValueError, match=r"mnist/test\): labels outside 0..9"):
        backbone.dataset("mnist", "test")


def test_each_offline_flag_is_obeyed_and_named(monkeypatch):
    for variable in _hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in _hub.OFFLINE_VARIABLES:
        with monkeypatch.context() as patch:
            patch.setenv(variable, "1")
            assert _hub.offline_reason() == f"offline mode: {variable} is set"
            assert not _hub.hub_reachable()
    assert _hub.offline_reason() is None


def test_probe_gives_the_reason_for_an_unresolvable_host_and_none_for_a_listening_one():
    import socket

    _hub.probe.cache_clear()
    assert _hub.probe("https://hub.invalid").startswith("no connection to hub.invalid:443")
    with socket.socket() as server:  # a local listener: the probe connects
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert _hub.probe(f"http://127.0.0.1:{server.getsockname()[1]}") is None


def test_missing_open_clip_file_and_incomplete_hf_checkpoint_are_named(files, tmp_path):
    partial = tmp_path / "open_clip"
    partial.mkdir()
    (partial / "zeroshot.pt").write_bytes((files["open_clip"] / "ViT-B-32" / "zeroshot.pt").read_bytes())
    with pytest.raises(MissingResourceError, match=r"(?s)local files.*MNIST/finetuned.pt"):
        TinyCLIP(checkpoint_dir=partial, data_dir=files["data"]).prepare()

    broken = tmp_path / "hf"
    broken.mkdir()
    (broken / "openai").symlink_to(files["hf"] / "openai")
    (broken / "svhn").symlink_to(files["hf"] / "svhn")
    (broken / "eurosat").symlink_to(files["hf"] / "tanganke" / "clip-vit-base-patch32_eurosat")
    tower = {k: v for k, v in files["towers"]["mnist"].items() if k != "post_layernorm.weight"}
    write_hub_vision_model(broken / "mnist", files["pretrained"], tower)
    with pytest.raises(CheckpointError, match=r"mnist: CLIPVisionModel weights missing.*post_layernorm.weight"):
        TinyCLIP(checkpoint_dir=broken, data_dir=files["data"]).prepare()
