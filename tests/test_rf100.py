"""The rf100 suite (detr-r50) end to end on tiny local files in the real formats: DETR
checkpoints written by DetrForObjectDetection.save_pretrained (use_timm_backbone=False, a
tiny ResNet, d_model 32, one encoder and decoder layer) and Roboflow COCO exports with
PNG images, for the seven domains.

The fine-tuned models are built so that their answers are known: the last layer of the
box MLP has zero weights, so every query predicts the box sigmoid(bias); each domain's
bias puts it on the one object of every image of its dataset, and its class head always
says category 1. One object query per image, so each image has one detection. Hence
Individual scores mAP@50 = 1 on every domain and Pretrained (box sigmoid(0)) scores 0. The
biases have entries of equal magnitude, so T-Switch with alpha = 0 (every entry kept,
beta = |tau|) reproduces them exactly; the domains' images differ in colour, so routing
by k-NN over pretrained features can find the domain.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
PIL_Image = pytest.importorskip("PIL.Image")

from mergebench.errors import MissingResourceError  # noqa: E402
from mergebench.cli import main  # noqa: E402
from mergebench.dynamic import KNNRouter  # noqa: E402
from mergebench.method import NotApplicableError  # noqa: E402
from mergebench.pool import CheckpointError, ModelPool  # noqa: E402
from mergebench.registry import BACKBONES, METHODS  # noqa: E402
from mergebench.results import load_results  # noqa: E402
from mergebench.runner import run  # noqa: E402
from mergebench.tasks import rf100  # noqa: E402
from mergebench.tasks.rf100 import DEFAULT_DATASETS, DOMAINS, RF100Detr  # noqa: E402

HEIGHT, WIDTH = 48, 64
SIGNS = [(1, 1, -1, -1), (-1, 1, -1, -1), (1, -1, -1, -1), (-1, -1, -1, -1)]
# box bias per domain: centres in the four quadrants, sizes sigmoid(-1) or sigmoid(-2): pairwise IoU < 0.5
BIASES = {domain: magnitude * torch.tensor(SIGNS[i % 4], dtype=torch.float32)
          for i, (domain, magnitude) in enumerate(zip(DOMAINS, (1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0)))}
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (230, 30, 230), (128, 128, 128)]


def tiny_config(labels: list[str]):
    from transformers import DetrConfig, ResNetConfig

    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])
    return DetrConfig(use_timm_backbone=False, backbone_config=backbone, d_model=32, encoder_layers=1,
                      decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                      decoder_attention_heads=2, num_queries=1, num_labels=len(labels),
                      id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})


def categories(domain: str) -> list[str]:
    """Roboflow style: id 0 is the dataset (super-category), then its classes; 3 or 4 of them."""
    return [DEFAULT_DATASETS[domain], "thing", "other", *(["third"] if DOMAINS.index(domain) % 2 else [])]


def object_box(domain: str) -> list[float]:
    cx, cy, w, h = torch.sigmoid(BIASES[domain]).tolist()
    return [(cx - w / 2) * WIDTH, (cy - h / 2) * HEIGHT, w * WIDTH, h * HEIGHT]


def write_split(folder: Path, domain: str, split: str, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = np.array(COLOURS[DOMAINS.index(domain)])
    images, annotations = [], []
    for k in range(count):
        pixels = np.clip(colour + rng.normal(0, 20, size=(HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        name = f"{split}{k}_png.rf.{seed:04x}{k}.png"
        PIL_Image.fromarray(pixels).save(folder / name)
        images.append({"id": k, "license": 1, "file_name": name, "height": HEIGHT, "width": WIDTH,
                       "date_captured": "2022-11-01T00:00:00+00:00"})
        box = object_box(domain)
        annotations.append({"id": k, "image_id": k, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                            "segmentation": [], "iscrowd": 0})
    names = categories(domain)
    coco = {"info": {"description": "tiny"}, "licenses": [{"id": 1, "name": "CC BY 4.0"}],
            "categories": [{"id": i, "name": n, "supercategory": "none" if i == 0 else names[0]} for i, n in enumerate(names)],
            "images": images, "annotations": annotations}
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


def finetuned_model(pretrained, domain: str, seed: int):
    """The pretrained model with small random task vectors, the domain's box bias and a class head on category 1."""
    from transformers import DetrForObjectDetection

    model = DetrForObjectDetection(tiny_config(categories(domain))).eval()
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("class_labels_classifier")}
    model.load_state_dict(state, strict=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(("class_labels_classifier", "bbox_predictor.layers.2")):
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        model.bbox_predictor.layers[2].bias.copy_(BIASES[domain])
        model.class_labels_classifier.weight.zero_()
        model.class_labels_classifier.bias.zero_()
        model.class_labels_classifier.bias[1] = 5.0
    return model


@pytest.fixture(scope="session")
def rf100_files(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, data dir) in the documented layouts."""
    from transformers import DetrForObjectDetection

    try:
        from transformers import DetrImageProcessorPil as Processor
    except ImportError:
        from transformers import DetrImageProcessor as Processor
    root = tmp_path_factory.mktemp("rf100")
    checkpoints, data = root / "checkpoints", root / "rf100"
    torch.manual_seed(0)
    pretrained = DetrForObjectDetection(tiny_config([f"coco-{i}" for i in range(6)])).eval()
    with torch.no_grad():
        pretrained.bbox_predictor.layers[2].weight.zero_()
        pretrained.bbox_predictor.layers[2].bias.zero_()
    pretrained.save_pretrained(checkpoints / "pretrained")
    Processor(size={"shortest_edge": HEIGHT, "longest_edge": WIDTH}).save_pretrained(checkpoints / "pretrained")
    for i, domain in enumerate(DOMAINS):
        finetuned_model(pretrained, domain, seed=i + 1).save_pretrained(checkpoints / domain)
        for j, (split, count) in enumerate((("train", 3), ("valid", 1), ("test", 3))):
            write_split(data / DEFAULT_DATASETS[domain] / split, domain, split, count, seed=10 * i + j)
    return checkpoints, data


@pytest.fixture(scope="session")
def prepared(rf100_files) -> RF100Detr:
    checkpoints, data = rf100_files
    backbone = RF100Detr(checkpoint_dir=checkpoints, data_dir=data)
    backbone.prepare()
    return backbone


# --- conversion -----------------------------------------------------------------------
def test_prepare_splits_each_checkpoint_into_merged_part_and_head(prepared, rf100_files, mergebench_cache):
    from safetensors.torch import load_file
    from transformers import DetrForObjectDetection

    assert prepared.root == mergebench_cache / "detr-r50"
    finetuned = DetrForObjectDetection.from_pretrained(str(rf100_files[0] / "underwater"))
    body = load_file(str(prepared.finetuned_checkpoint("underwater")))
    head = load_file(str(prepared.root / "underwater.head.safetensors"))
    state = finetuned.state_dict()
    assert not any(k.startswith("class_labels_classifier") for k in body)
    assert set(body) | {f"class_labels_classifier.{k}" for k in head} == set(state)
    assert all(torch.equal(body[k], state[k]) for k in body)
    assert torch.equal(head["bias"], state["class_labels_classifier.bias"]) and head["bias"][1] == 5.0
    assert head["weight"].shape == (5, 32)  # 4 categories + "no object"
    assert set(load_file(str(prepared.pretrained_checkpoint()))) == set(body)
    assert [t.name for t in prepared.tasks] == list(DOMAINS)
    assert prepared.task("underwater").classes == tuple(categories("underwater"))
    assert {t.metric for t in prepared.tasks} == {"map50"}
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    assert manifest["data_dir"] == str(rf100_files[1].resolve())
    with ModelPool(prepared) as pool:  # the pool reads and validates every converted checkpoint
        assert any(pool.task_vector("aerial", k).abs().sum() > 0 for k in pool.merged_keys)
        assert torch.equal(pool.task_vector("aerial", "bbox_predictor.layers.2.bias"), BIASES["aerial"])


def test_encoder_and_head_reproduce_detr(prepared, rf100_files):
    from safetensors.torch import load_file
    from transformers import DetrForObjectDetection

    model = DetrForObjectDetection.from_pretrained(str(rf100_files[0] / "underwater")).eval()
    encoder = prepared.build_encoder().eval()
    encoder.load_state_dict(load_file(str(prepared.finetuned_checkpoint("underwater"))))
    underwater = prepared.task("underwater")
    inputs, ids = next(underwater.batches("test", 2))
    assert inputs["pixel_values"].shape == (2, 3, HEIGHT, WIDTH) and ids.tolist() == [0, 1]
    with torch.no_grad():
        expected = model(**inputs)
        output = underwater.head()(encoder(**inputs))
    assert output.shape == (2, 1, 5 + 4)  # 4 categories + "no object", then the box
    torch.testing.assert_close(output[..., :-4], expected.logits)
    torch.testing.assert_close(output[..., -4:], expected.pred_boxes)
    assert underwater.routing_features(encoder(**inputs)).shape == (2, 1, 32)


def test_prepare_again_reuses_the_conversion_and_run_needs_no_options(prepared, rf100_files):
    before = (prepared.root / "aerial.safetensors").stat().st_mtime_ns
    RF100Detr(checkpoint_dir=rf100_files[0], data_dir=rf100_files[1]).prepare()
    assert (prepared.root / "aerial.safetensors").stat().st_mtime_ns == before
    backbone = BACKBONES.get("detr-r50")()  # what `mergebench run --backbone detr-r50` builds
    backbone.prepare()
    assert backbone.data_root() == rf100_files[1].resolve()
    assert len(backbone.tasks) == 7


# --- the runner ---------------------------------------------------------------------------
SMALL = {"exemplars": 3, "router_steps": 5, "steps": 2, "neighbours": 3}  # what 3 train images per domain allow
EXACT = {"t-switch": {"alpha": 0.0}, "auto-switch": {"alpha": 0.0}}  # keep every entry of the task vectors


@pytest.fixture(scope="module")
def results(prepared, tmp_path_factory) -> dict:
    """One real runner.run per registered method on the prepared files (NotApplicableError where it is)."""
    folder = tmp_path_factory.mktemp("rf100-results")
    outcomes: dict = {"folder": folder}
    for name in METHODS.names():
        method = METHODS.get(name)
        hp = {k: v for k, v in SMALL.items() if k in method.hyperparameters} | EXACT.get(name, {})
        try:
            outcomes[name] = run(name, "detr-r50", hyperparameters=hp, results_dir=folder, batch_size=2)
        except NotApplicableError as error:
            outcomes[name] = error
    return outcomes


def test_individual_is_perfect_and_pretrained_finds_nothing(results):
    assert results["individual"].metrics == pytest.approx({domain: 1.0 for domain in DOMAINS})
    assert results["pretrained"].metrics == pytest.approx({domain: 0.0 for domain in DOMAINS})
    assert results["individual"].suite == "rf100"


def test_task_arithmetic_mixes_the_boxes(results):
    assert results["task-arithmetic"].average < 0.5


def test_t_switch_with_every_entry_kept_reproduces_the_boxes(results):
    assert results["t-switch"].metrics == pytest.approx({domain: 1.0 for domain in DOMAINS})
    assert results["t-switch"].extra_storage_bytes > 0


def test_auto_switch_routes_each_image_to_its_domain(results):
    result = results["auto-switch"]
    assert result.diagnostics["routing_accuracy_mean"] == 1.0
    assert result.metrics == pytest.approx({domain: 1.0 for domain in DOMAINS})


def test_every_method_runs_or_is_not_applicable(results):
    recorded = {r.method: r for r in load_results(results["folder"])}
    for name in METHODS.names():
        if not all(METHODS.get(name).requires <= task.capabilities for task in RF100Detr().tasks):
            assert isinstance(results[name], NotApplicableError), name
            assert "not applicable to backbone 'detr-r50'" in str(results[name])
            assert name not in recorded  # nothing recorded
        else:
            assert set(results[name].metrics) == set(DOMAINS), name
            assert all(0.0 <= value <= 1.0 for value in results[name].metrics.values()), name
            assert recorded[name].backbone == "detr-r50"


def test_flexswitch_uses_the_mse_loss_on_a_detector(results, prepared):
    assert results["flexswitch"].hyperparameters["loss"] == "mse"  # the paper's choice for DETR
    assert results["auto-flexswitch"].hyperparameters["loss"] == "mse"
    assert results["auto-flexswitch"].diagnostics["routing_accuracy_mean"] == 1.0  # centres of query vectors, voted
    with pytest.raises(ValueError, match="loss 'kl' reads one output vector per input, which the tasks of detr-r50"):
        run("flexswitch", "detr-r50", hyperparameters={"loss": "kl", "exemplars": 3, "steps": 1}, results_dir=None)


def test_adamerging_and_fisher_are_not_applicable_to_detection():
    assert {name for name in METHODS.names() if METHODS.get(name).requires} == {"adamerging", "adamerging++", "fisher"}
    assert not any(task.capabilities for task in RF100Detr().tasks)  # per-query classes and boxes


def test_cli_reports_not_applicable_and_runs_the_rest(prepared, tmp_path, capsys):
    code = main(["run", "--method", "adamerging,pretrained", "--backbone", "detr-r50", "--results-dir", str(tmp_path),
                 "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0
    assert "'adamerging' is not applicable to backbone 'detr-r50'" in captured.err and "nothing recorded" in captured.err
    assert [r.method for r in load_results(tmp_path)] == ["pretrained"]
    code = main(["run", "--method", "fisher", "--backbone", "detr-r50", "--results-dir", str(tmp_path)])
    assert code == 0 and "not applicable" in capsys.readouterr().err
    assert len(load_results(tmp_path)) == 1


def test_list_shows_the_backbone_and_suite(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "detr-r50" in out and "rf100" in out


# --- routing: majority vote over object queries ----------------------------------------------
def test_knn_router_votes_per_image():
    queries = torch.tensor([[[0.0, 0.0], [0.1, 0.0]], [[10.0, 0.0], [10.1, 0.0]]])  # 2 exemplars x 2 vectors
    router = KNNRouter(lambda x: x, queries, torch.tensor([0, 1]), num_tasks=2, neighbours=1, by_parts=True)
    features = torch.tensor([
        [[0.0, 0.1], [10.0, 0.1], [10.0, 0.2]],  # 2 of 3 vectors near task 1
        [[0.0, 0.1], [0.1, 0.1], [10.0, 0.0]],  # 2 of 3 near task 0
        [[0.0, 0.1], [10.0, 0.1], [6.0, 50.0]],  # 1:1 plus a far vector slightly nearer task 1 -> task 1
        [[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]],
    ])
    weights = router(features)
    assert weights.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    per_input = KNNRouter(lambda x: x, queries.flatten(0, 1), torch.tensor([0, 0, 1, 1]), num_tasks=2, neighbours=1)
    flat = per_input(torch.tensor([[0.0, 0.1], [10.0, 0.1]]))  # one vector per input: no vote
    assert flat.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_knn_router_tie_goes_to_the_lower_task():
    queries = torch.tensor([[[0.0], [1.0]], [[10.0], [11.0]]])
    router = KNNRouter(lambda x: x, queries, torch.tensor([0, 1]), num_tasks=2, neighbours=1, by_parts=True)
    assert router(torch.tensor([[[10.0], [0.0]]])).tolist() == [[1.0, 0.0]]


# --- missing and bad resources --------------------------------------------------------------------
def test_nothing_prepared_fails_at_once_naming_both_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(MissingResourceError, match="--data-dir.*--checkpoint-dir"):
        RF100Detr().prepare()
    assert main(["run", "--method", "task-arithmetic", "--backbone", "detr-r50", "--results-dir", str(tmp_path)]) == 2
    assert "not prepared" in capsys.readouterr().err
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "detr-r50.jsonl").exists()


def test_missing_checkpoint_folders_are_all_named(rf100_files, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "aerial").mkdir()
    with pytest.raises(MissingResourceError) as error:
        RF100Detr(checkpoint_dir=checkpoints, data_dir=rf100_files[1]).prepare()
    message = str(error.value)
    assert f"{checkpoints / 'aerial'} (no config.json)" in message
    assert all(str(checkpoints / domain) in message for domain in DOMAINS)


def test_missing_pretrained_offline_fails_in_seconds(rf100_files, tmp_path, monkeypatch):
    """No <checkpoint-dir>/pretrained and the hub model not cached: no download is tried offline."""
    import shutil

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rf100, "HUB_ID", "mergebench-tests/no-such-detr")  # certainly not in any HF cache
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(rf100_files[0], checkpoints, ignore=lambda folder, names: ["pretrained"] if folder == str(rf100_files[0]) else [])
    start = time.perf_counter()
    with pytest.raises(MissingResourceError, match="pretrained DETR is missing.*save_pretrained"):
        RF100Detr(checkpoint_dir=checkpoints, data_dir=rf100_files[1]).prepare()
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "cache" / "detr-r50" / "manifest.json").exists()


def test_missing_data_names_the_file_and_option(rf100_files, tmp_path):
    with pytest.raises(MissingResourceError, match=r"aerial-pool/test/_annotations\.coco\.json is missing.*--data-dir"):
        RF100Detr(data_dir=tmp_path).split("aerial", "test")


def test_domains_json_picks_other_datasets(rf100_files, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(rf100_files[1], data)
    shutil.move(data / DEFAULT_DATASETS["aerial"], data / "aerial-spheres")
    (data / "domains.json").write_text(json.dumps({"aerial": "aerial-spheres"}))
    backbone = RF100Detr(data_dir=data)
    assert backbone.datasets()["aerial"] == "aerial-spheres"
    assert backbone.split("aerial", "test").path == data / "aerial-spheres" / "test" / "_annotations.coco.json"
    (data / "domains.json").write_text(json.dumps({"aerials": "x"}))
    with pytest.raises(ValueError, match="unknown domain.*aerials"):
        RF100Detr(data_dir=data).datasets()


def test_bad_annotations_are_named(tmp_path):
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"_annotations\.coco\.json: key 'annotations'"):
        rf100.load_coco(path)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 2, "height": 2}], "categories": [],
                                "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match="annotation 1 refers to image 2"):
        rf100.load_coco(path)


def test_categories_must_be_classes_of_the_model(prepared, rf100_files, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(rf100_files[1], data)
    path = data / DEFAULT_DATASETS["aerial"] / "test" / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    coco["categories"].append({"id": 9, "name": "extra", "supercategory": "x"})
    path.write_text(json.dumps(coco))
    with pytest.raises(CheckpointError, match=r"category 9 \('extra'\) is not a class of the 'aerial' model"):
        RF100Detr(checkpoint_dir=rf100_files[0], data_dir=data).prepare()


def test_a_different_architecture_is_refused(rf100_files, tmp_path, monkeypatch):
    import shutil

    from transformers import DetrForObjectDetection

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(rf100_files[0], checkpoints)
    config = tiny_config(categories("videogames"))
    config.num_queries = 2
    DetrForObjectDetection(config).save_pretrained(checkpoints / "videogames")
    with pytest.raises(CheckpointError, match=r"videogames/config.json: architecture differs.*num_queries"):
        RF100Detr(checkpoint_dir=checkpoints, data_dir=rf100_files[1]).prepare()
    assert not (tmp_path / "cache" / "detr-r50" / "manifest.json").exists()  # nothing half-converted is used


def test_timm_backbone_without_timm_is_explained(tmp_path):
    """A checkpoint with a timm backbone (facebook/detr-resnet-50's main revision): without a working
    timm the error names it and the way around it; with timm it loads (and then lacks its weights)."""
    import importlib.util

    folder = tmp_path / "timm-detr"
    folder.mkdir()
    config = tiny_config(["a", "b"]).to_dict()
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet18")
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"class_labels_classifier.bias": torch.zeros(3)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=str(folder)) as error:
        rf100.load_detr(folder)
    if importlib.util.find_spec("timm") is None:
        assert "timm" in str(error.value) and "no_timm" in str(error.value)

