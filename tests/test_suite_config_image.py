"""Image suite files (kinds image-classification and clip): tiny ViT, ConvNeXt and CLIP
checkpoints and images written here are prepared, merged, evaluated and exported through the
command line; every bad input named in one line with its key and file."""
from __future__ import annotations

import io
import json
import string

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergebench.cli import main
from mergebench.errors import MergebenchError
from mergebench.suite_config import ENVIRONMENT, SuiteConfigError, register_suite_config

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30)}
TONES = {"dark": 40, "light": 215}


@pytest.fixture(autouse=True)
def no_inherited_suite_files(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT, "")


def picture(rng, rgb):
    from PIL import Image

    pixels = np.clip(np.asarray(rgb)[None, None, :] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def perturbed(module: torch.nn.Module, scale: float = 0.05) -> None:
    """A stand-in for fine-tuning: a task-specific change of every weight."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints (ViT, ConvNeXt, CLIP: pretrained + two tasks each) and data: an image
    folder (colour), a parquet file with encoded images and ClassLabel names (tone), a JSON
    lines file of image paths and label names (colour)."""
    import datasets
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModel,
                              ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor, ConvNextModel,
                              ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("image-suite-files")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    rows = {"train": [], "test": []}
    for split, n in (("train", 3), ("test", 2)):
        for colour, rgb in COLOURS.items():
            folder = root / "images" / split / colour
            folder.mkdir(parents=True)
            for i in range(n):
                picture(rng, rgb).save(folder / f"{i}.png")
                rows[split].append({"file": f"images/{split}/{colour}/{i}.png", "colour": colour})
        (root / f"colour-{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[split]) + "\n")
        images, labels = [], []
        for label, level in enumerate(TONES.values()):
            for _ in range(n):
                buffer = io.BytesIO()
                picture(rng, (level, level, level)).save(buffer, format="PNG")
                images.append({"bytes": buffer.getvalue(), "path": None})
                labels.append(label)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(TONES))})
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(root / f"tone-{split}.parquet"))
    heads = {"colour": ["red", "green"], "tone": list(TONES), "three": ["a", "b", "c"]}

    def labelled(config, task):
        return {**config.to_dict(), "id2label": dict(enumerate(heads[task])),
                "label2id": {name: i for i, name in enumerate(heads[task])}}

    # ViT: a ViTModel as pretrained (as google/vit-base-patch16-224-in21k is), classifiers per task
    vit = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    pretrained = ViTModel(vit, add_pooling_layer=False)
    pretrained.save_pretrained(root / "vit-pretrained")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit-pretrained")
    for task in heads:
        model = ViTForImageClassification(ViTConfig(**labelled(vit, task)))
        model.vit.load_state_dict(pretrained.state_dict())
        perturbed(model.vit)
        model.save_pretrained(root / f"vit-{task}")
    other = ViTConfig(**{**labelled(vit, "colour"), "patch_size": 4})  # the same family at another size
    ViTForImageClassification(other).save_pretrained(root / "vit-patch4-colour")
    # ConvNeXt
    convnext = ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                              image_size=32)
    pretrained = ConvNextModel(convnext)
    pretrained.save_pretrained(root / "convnext-pretrained")
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(root / "convnext-pretrained")
    for task in ("colour", "tone"):
        model = ConvNextForImageClassification(ConvNextConfig(**labelled(convnext, task)))
        model.convnext.load_state_dict(pretrained.state_dict())
        perturbed(model.convnext)
        model.save_pretrained(root / f"convnext-{task}")
    # CLIP with a character-level BPE vocabulary
    chars = list(string.ascii_lowercase + string.digits + ".,!'\"-:_ ")
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    clip = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=48, bos_token_id=bos,
                                       eos_token_id=eos, pad_token_id=eos),
                      vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    pretrained = CLIPModel(clip)
    pretrained.save_pretrained(root / "clip-pretrained")
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "clip-pretrained")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        root / "clip-pretrained")
    tower = CLIPVisionModel(clip.vision_config)  # FusionBench's layout: the vision tower alone
    getattr(tower, "vision_model", tower).load_state_dict(pretrained.vision_model.state_dict())
    perturbed(tower)
    tower.save_pretrained(root / "clip-colour")
    whole = CLIPModel(clip)  # a whole CLIPModel fine-tuned (its text tower is not read)
    whole.load_state_dict(pretrained.state_dict())
    perturbed(whole.vision_model)
    perturbed(whole.visual_projection)
    whole.save_pretrained(root / "clip-tone")
    wider = CLIPVisionModel(type(clip.vision_config)(**{**clip.vision_config.to_dict(), "hidden_size": 16}))
    wider.save_pretrained(root / "clip-narrow-colour")
    return root


VIT = '''name = "{name}"
kind = "image-classification"
pretrained = "./vit-pretrained"

[tasks.colour]
checkpoint = "./vit-colour"
train = "images/train"
test = "images/test"

[tasks.tone]
checkpoint = "./vit-tone"
train = "tone-train.parquet"
test = "tone-test.parquet"
image = "image"
label = "label"
'''

CONVNEXT = '''name = "{name}"
kind = "image-classification"
pretrained = "./convnext-pretrained"

[tasks.colour]
checkpoint = "./convnext-colour"
train = "colour-train.jsonl"
test = "colour-test.jsonl"
image = "file"
label = "colour"

[tasks.tone]
checkpoint = "./convnext-tone"
train = "tone-train.parquet"
test = "tone-test.parquet"
image = "image"
label = "label"
metric = "matthews"
'''

CLIP = '''name = "{name}"
kind = "clip"
pretrained = "./clip-pretrained"

[tasks.colour]
checkpoint = "./clip-colour"
train = "images/train"
test = "images/test"

[tasks.tone]
checkpoint = "./clip-tone"
train = "tone-train.parquet"
test = "tone-test.parquet"
image = "image"
label = "label"
templates = ["a {{}} photo.", "a photo of a {{c}} thing."]
'''


def write(folder, text: str, name: str, replace: dict[str, str] | None = None):
    text = text.format(name=name)
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_image_data_are_read_as_written(files):
    """The three layouts give the images and labels the fixture wrote (not the module's helpers' view of them)."""
    from mergebench.tasks.suite_files_image import ImageSuiteTaskData

    from mergebench.registry import BACKBONES

    register_suite_config(write(files, CONVNEXT, "layouts"))
    backbone = BACKBONES.get("layouts")()
    data = ImageSuiteTaskData(backbone)
    images, labels = data.split("colour", "test")
    written = [json.loads(line) for line in (files / "colour-test.jsonl").read_text().splitlines()]
    assert [str(p) for p in images.images] == [str(files / r["file"]) for r in written]
    assert labels.tolist() == [["red", "green"].index(r["colour"]) for r in written]  # the head's id2label order
    images, labels = data.split("tone", "train")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and all(isinstance(i, bytes) for i in images.images)


@pytest.mark.parametrize("family", ["vit", "convnext", "clip"])
def test_an_image_suite_file_runs_end_to_end(files, tmp_path, family):
    name = f"img-{family}"
    suite = write(files, {"vit": VIT, "convnext": CONVNEXT, "clip": CLIP}[family], name)
    results = tmp_path / "results"
    assert main(["prepare", "--suite-config", str(suite)]) == 0
    assert main(["run", "--suite-config", str(suite), "--method", "pretrained,task-arithmetic",
                 "--results-dir", str(results)]) == 0
    records = [json.loads(line) for line in (results / f"{name}.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["pretrained", "task-arithmetic"]
    assert all(r["suite"] == name and set(r["metrics"]) == {"colour", "tone"} for r in records)
    assert all(-1 <= value <= 1 for r in records for value in r["metrics"].values())  # matthews: -1..1
    expected = {"vit": pretrained_vit_accuracy, "convnext": None, "clip": pretrained_clip_accuracy}[family]
    if expected is not None:
        for task in ("colour", "tone"):
            assert records[0]["metrics"][task] == pytest.approx(expected(files, task)), task


def test_images(files, task: str, split: str = "test"):
    """(PIL images, label names) of a split, read here with PIL and pandas alone."""
    import pandas as pd
    from PIL import Image

    if task == "colour":
        pairs = [(path, path.parent.name) for colour in sorted(COLOURS)
                 for path in sorted((files / "images" / split / colour).iterdir())]
        return [Image.open(p).convert("RGB") for p, _ in pairs], [c for _, c in pairs]
    frame = pd.read_parquet(files / f"tone-{split}.parquet")
    return ([Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in frame["image"]],
            [list(TONES)[i] for i in frame["label"]])


test_images.__test__ = False  # a helper, not a test


def pretrained_vit_accuracy(files, task: str) -> float:
    """The pretrained ViT with the task's fine-tuned classifier, with transformers alone."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    classifier = ViTForImageClassification.from_pretrained(str(files / f"vit-{task}")).eval()
    model = ViTForImageClassification.from_pretrained(str(files / "vit-pretrained"),
                                                      num_labels=classifier.config.num_labels).eval()
    model.classifier.load_state_dict(classifier.classifier.state_dict())
    images, names = test_images(files, task)
    pixels = AutoImageProcessor.from_pretrained(str(files / "vit-pretrained"))(images=images, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**pixels).logits.argmax(1).numpy()
    return float(np.mean(predictions == np.array([classifier.config.label2id[n] for n in names])))


def pretrained_clip_accuracy(files, task: str) -> float:
    """CLIP's zero-shot accuracy (CLIP paper: normalised text embeddings averaged over templates), with transformers alone."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(files / "clip-pretrained")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(files / "clip-pretrained"))
    classes = sorted(COLOURS) if task == "colour" else list(TONES)
    templates = ["a photo of a {}."] if task == "colour" else ["a {} photo.", "a photo of a {} thing."]
    with torch.no_grad():
        weights = []
        for name in classes:
            tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            text = model.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text)
            text = text / text.norm(dim=-1, keepdim=True)
            weights.append(text.mean(0) / text.mean(0).norm())
        images, names = test_images(files, task)
        pixels = AutoImageProcessor.from_pretrained(str(files / "clip-pretrained"))(images=images, return_tensors="pt")
        features = model.get_image_features(**pixels)
        features = getattr(features, "pooler_output", features)
        predictions = (features @ torch.stack(weights).T).argmax(1).numpy()
    return float(np.mean(predictions == np.array([classes.index(n) for n in names])))


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_an_exported_image_merge_loads_with_plain_transformers(files, tmp_path, family):
    """``run --save-merged``: the folder's model, loaded with transformers and given the task's
    head from heads.safetensors, gives the logits of mergebench's evaluation and the recorded accuracy."""
    import mergebench
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection, ViTForImageClassification

    name = f"export-{family}"
    suite = write(files, VIT if family == "vit" else CLIP, name)
    out, results = tmp_path / "merged", tmp_path / "results"
    assert main(["prepare", "--suite-config", str(suite)]) == 0
    assert main(["run", "--suite-config", str(suite), "--method", "task-arithmetic", "--results-dir", str(results),
                 "--save-merged", str(out)]) == 0
    record, = [json.loads(line) for line in (results / f"{name}.jsonl").read_text().splitlines()]
    heads = load_file(str(out / "heads.safetensors"))
    processor = AutoImageProcessor.from_pretrained(str(out))  # the suite's image processor is exported beside the model
    loaded = mergebench.load(out)
    if family == "vit":
        model = ViTForImageClassification.from_pretrained(str(out)).eval()
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(str(out)).eval()
    for task in ("colour", "tone"):
        images, names = test_images(files, task)
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            if family == "vit":
                cls = model.vit(pixel_values=pixels).last_hidden_state[:, 0]  # ViT's classifier reads the final [CLS]
                logits = cls @ heads[f"{task}.weight"].T + heads[f"{task}.bias"]
                labels = ["red", "green"].index if task == "colour" else list(TONES).index
            else:
                embeds = model(pixel_values=pixels).image_embeds
                logits = heads[f"{task}.logit_scale"] * (embeds / embeds.norm(dim=-1, keepdim=True)) @ heads[f"{task}.weight"].T
                labels = sorted(COLOURS).index if task == "colour" else list(TONES).index
        torch.testing.assert_close(logits, loaded(task=task, pixel_values=pixels), rtol=1e-4, atol=1e-5)
        accuracy = float(np.mean(logits.argmax(1).numpy() == np.array([labels(n) for n in names])))
        assert accuracy == pytest.approx(record["metrics"][task], abs=1e-9)
    # `merge --out` writes the same model without evaluating it
    assert main(["merge", "--suite-config", str(suite), "--method", "task-arithmetic", "--out", str(tmp_path / "m")]) == 0
    written = [json.loads((folder / "mergebench.json").read_text())["files"] for folder in (out, tmp_path / "m")]
    assert written[0] == written[1] and {"model.safetensors", "heads.safetensors", "preprocessor_config.json"} <= set(
        written[0])


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, replace, match", [
    (VIT, {'kind = "image-classification"': 'kind = "image-clasification"'},
     r"bad-0\.toml: kind: unknown suite kind 'image-clasification'; valid suite kinds: clip, image-classification, "
     r"text-classification"),
    (VIT, {'checkpoint = "./vit-tone"': 'checkpoint = "./convnext-tone"'},
     r"bad-1\.toml: tasks\.tone\.checkpoint: .*convnext-tone is a 'convnext' model, the pretrained model .*vit-pretrained "
     r"a 'vit' one: architectures differ"),
    (VIT, {'checkpoint = "./vit-colour"': 'checkpoint = "./vit-three"'},
     r"bad-2\.toml: tasks\.colour\.label: label 'green' in .*images/train is not one of the head's 3 classes "
     r"\(id2label: a, b, c\)"),
    (VIT, {'checkpoint = "./vit-tone"': 'checkpoint = "./vit-three"'},
     r"bad-3\.toml: tasks\.tone\.label: the data has 2 distinct labels, the head of .*vit-three has 3 outputs "
     r"\(a, b, c\)"),
    (VIT, {'train = "images/train"': 'train = "images/validation"'},
     r"bad-4\.toml: tasks\.colour\.train: data file or image folder .*images/validation does not exist"),
    (VIT, {'image = "image"': 'image = "img"'},
     r"bad-5\.toml: tasks\.tone\.image: column 'img' is not in .*tone-train\.parquet; its columns: image, label"),
    (VIT, {'image = "image"\n': ''}, r"bad-6\.toml: missing key 'tasks\.tone\.image': .*tone-train\.parquet is not an "
                                     r"image folder"),
    (VIT, {'test = "images/test"': 'test = "images/test"\nimage = "image"'},
     r"bad-7\.toml: tasks\.colour\.image: .*images/train is an image folder"),
    (VIT, {'test = "images/test"': 'test = "images/test"\ntemplates = ["a {}."]'},
     r"bad-8\.toml: kind 'image-classification' does not use key 'tasks\.colour\.templates'"),
    (CLIP, {'templates = ["a {} photo.", "a photo of a {c} thing."]': 'templates = ["a photo of a {x}."]'},
     r"bad-9\.toml: tasks\.tone\.templates: template 'a photo of a \{x\}\.' must mark the class name once"),
    (CLIP, {'templates = ["a {} photo.", "a photo of a {c} thing."]': 'templates = "imagenet"'},
     r"bad-10\.toml: tasks\.tone\.templates: no template set 'imagenet'; the named sets: sun397,"),
    (CLIP, {'train = "tone-train.parquet"\ntest = "tone-test.parquet"\nimage = "image"\nlabel = "label"':
            'train = "colour-train.jsonl"\ntest = "colour-test.jsonl"\nimage = "file"\nlabel = "colour"\n'
            'classes = ["red", "blue"]'},
     r"bad-11\.toml: tasks\.tone\.label: label 'green' in .*colour-train\.jsonl is not one of the head's 2 classes "
     r"\(classes: red, blue\)"),
    (CLIP, {'pretrained = "./clip-pretrained"': 'pretrained = "./vit-pretrained"'},
     r"bad-12\.toml: pretrained: .*vit-pretrained is a 'vit' model; kind 'clip' needs a CLIPModel"),
    (CLIP, {'checkpoint = "./clip-colour"': 'checkpoint = "./vit-colour"'},
     r"bad-13\.toml: tasks\.colour\.checkpoint: .*vit-colour is a 'vit' model, the pretrained model .* a 'clip' one: "
     r"architectures differ"),
    (VIT, {'checkpoint = "./vit-colour"': 'checkpoint = "./vit-patch4-colour"'},
     r"bad-14\.toml: tasks\.colour\.checkpoint: .*vit-patch4-colour has patch_size 4, the pretrained model 8: "
     r"architectures differ"),
    (CLIP, {'checkpoint = "./clip-colour"': 'checkpoint = "./clip-narrow-colour"'},
     r"bad-15\.toml: tasks\.colour\.checkpoint: .*clip-narrow-colour has a vision tower of hidden_size 16, the "
     r"pretrained model 32: architectures differ"),
])
def test_bad_image_suite_files_are_named_with_their_key(files, text, replace, match):
    stem = match.split("\\")[0]
    with pytest.raises(SuiteConfigError, match=match):
        register_suite_config(write(files, text, stem, replace))


def test_clip_labels_given_as_indices_need_class_names(files, tmp_path):
    """A table of integer labels with no ClassLabel names: the classes must be listed."""
    import pandas as pd

    for split in ("train", "test"):  # pandas keeps no Hub feature metadata
        pd.read_parquet(files / f"tone-{split}.parquet").to_parquet(tmp_path / f"plain-{split}.parquet")
    suite = write(files, CLIP, "indices", {'train = "tone-train.parquet"\ntest = "tone-test.parquet"':
                                           f'train = "{tmp_path / "plain-train.parquet"}"\n'
                                           f'test = "{tmp_path / "plain-test.parquet"}"'})
    with pytest.raises(SuiteConfigError, match=r"indices\.toml: tasks\.tone\.classes: the labels are class indices and "
                                               r"nothing names the classes"):
        register_suite_config(suite)


def test_a_hub_image_dataset_fails_fast_offline(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = write(files, VIT, "hub-images", {'train = "tone-train.parquet"\ntest = "tone-test.parquet"':
                                             'dataset = "someone/not-cached-images"\ntrain = "train"\ntest = "test"'})
    with pytest.raises(MergebenchError, match=r"someone/not-cached-images.*offline mode: HF_HUB_OFFLINE"):
        register_suite_config(suite)


def test_a_hub_image_dataset_in_the_hub_cache_is_read_offline(files, tmp_path, monkeypatch):
    """A Hub dataset's parquet files already in the hub cache: read without the network, its
    ClassLabel names the CLIP task's classes, scored as the same files given locally."""
    import shutil

    from huggingface_hub import constants

    from mergebench.registry import SUITES

    snapshot = tmp_path / "hub" / "datasets--someone--tones" / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for split in ("train", "test"):
        shutil.copyfile(files / f"tone-{split}.parquet", snapshot / "data" / f"{split}-00000-of-00001.parquet")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    suite = write(files, CLIP, "hub-tones", {'train = "tone-train.parquet"\ntest = "tone-test.parquet"':
                                             'dataset = "someone/tones"\ntrain = "train"\ntest = "test"'})
    results = tmp_path / "results"
    assert main(["prepare", "--suite-config", str(suite)]) == 0
    assert main(["run", "--suite-config", str(suite), "--method", "pretrained", "--results-dir", str(results)]) == 0
    assert next(t for t in SUITES.get("hub-tones").tasks if t.name == "tone").classes == tuple(TONES)
    record = json.loads((results / "hub-tones.jsonl").read_text())
    assert record["metrics"]["tone"] == pytest.approx(pretrained_clip_accuracy(files, "tone"))


def test_an_unreadable_image_is_named_in_one_line(files, tmp_path, capsys):
    """Images are decoded when read: a cell PIL cannot read stops the run with its row and file."""
    import pandas as pd

    frame = pd.read_parquet(files / "tone-test.parquet")
    frame.at[1, "image"] = {"bytes": b"not an image", "path": None}
    frame.to_parquet(tmp_path / "broken.parquet")
    suite = write(files, VIT, "broken-image", {'test = "tone-test.parquet"': f'test = "{tmp_path / "broken.parquet"}"'})
    assert main(["prepare", "--suite-config", str(suite)]) == 0
    capsys.readouterr()
    assert main(["run", "--suite-config", str(suite), "--method", "task-arithmetic", "--no-save"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the image of row 1 of" in error and "broken.parquet: not an image PIL can read" in error
