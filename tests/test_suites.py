"""Suites and Tasks: the registry of suites, each suite's tasks and backbones, task
capabilities in place of task-type strings, and a new kind of task that no method knows."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from mergebench.cli import main
from mergebench.errors import NotApplicableError
from mergebench.evaluate import evaluate
from mergebench.method import Method, StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES, METHODS, SUITES, register_suite
from mergebench.suite import Suite, declared_tasks
from mergebench.task import CLASS_DISTRIBUTION, OUTPUT_PER_INPUT, Task, routing_view
from tests._stub import StubBackbone, StubData, tensors

SUITE_TASKS = {
    "tiny": ["markers-a", "markers-b", "markers-c"],
    "mini": ["fortune-topic", "word-language", "debian-section", "noun-supersense", "verb-supersense",
             "unicode-category", "bible-genre", "code-language"],
    "glue": ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"],
    "vision-8": ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"],
    "rf100": ["aerial", "videogames", "microscopic", "underwater", "documents", "electromagnetic", "real-world"],
}


# --- the registry ----------------------------------------------------------------------------
def test_the_registry_lists_every_suite_with_its_tasks():
    assert set(SUITE_TASKS) <= set(SUITES.names())
    for name, tasks in SUITE_TASKS.items():
        suite = SUITES.get(name)
        assert suite.name == name
        assert [task.name for task in suite.tasks] == tasks


def test_every_backbone_covers_tasks_of_its_suite():
    for name, cls in BACKBONES.items():
        suite = SUITES.get(cls.suite)
        assert name in suite.backbones
        assert [task.name for task in suite.tasks_for(cls)] == list(cls.task_names)


def test_suite_backbones():
    assert SUITES.get("glue").backbones == ["mamba-130m", "roberta-base"]
    assert SUITES.get("vision-8").backbones == ["clip-vit-b32", "clip-vit-l14", "convnext-base"]
    assert SUITES.get("rf100").backbones == ["detr-r50"] and SUITES.get("mini").backbones == ["minilm-l6"]


def test_glue_backbones_share_one_suite_and_mamba_says_what_it_lacks():
    roberta, mamba = BACKBONES.get("roberta-base"), BACKBONES.get("mamba-130m")
    glue = SUITES.get(roberta.suite)
    assert SUITES.get(mamba.suite) is glue
    assert glue.missing(roberta) == ()
    assert glue.missing(mamba) == ("stsb",)
    assert [t.name for t in glue.tasks_for(mamba)] == [t for t in SUITE_TASKS["glue"] if t != "stsb"]


def test_metrics_and_outputs_of_the_declared_tasks():
    glue = SUITES.get("glue")
    assert (glue.task("cola").metric, glue.task("cola").outputs) == ("matthews", "class-logits")
    assert (glue.task("stsb").metric, glue.task("stsb").outputs) == ("pearson_spearman", "regression")
    assert {t.metric for t in SUITES.get("rf100").tasks} == {"map50"}
    assert {t.outputs for t in SUITES.get("rf100").tasks} == {"detection"}
    assert len(SUITES.get("vision-8").task("mnist").classes) == 10
    with pytest.raises(KeyError, match="suite 'glue' has no task 'wnli'; its tasks: cola"):
        glue.task("wnli")


def test_list_shows_the_suites_with_their_tasks_and_backbones(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    suites = out[out.index("\nSuites\n"):]
    assert "mamba-130m (no stsb)" in suites and "roberta-base" in suites
    assert "cola, sst2, mrpc, stsb" in suites and "rf100" in suites


# --- tasks of a backbone --------------------------------------------------------------------
def test_a_backbones_tasks_are_its_suites_bound_to_its_data(tiny_bert):
    tasks = tiny_bert.tasks
    assert [t.name for t in tasks] == SUITE_TASKS["tiny"]
    assert len({id(t.data) for t in tasks}) == 1  # one TaskData: every dataset loaded once
    assert tiny_bert.task("markers-a").classes == ("a0", "a1", "a2")
    inputs, labels = next(tiny_bert.task("markers-a").batches("test", 4))
    assert inputs["input_ids"].shape[0] == len(labels) == 4
    assert isinstance(tiny_bert.task("markers-a").head(), nn.Module)
    with pytest.raises(KeyError, match="backbone 'tiny-bert' has no task 'markers-z'; its tasks: markers-a"):
        tiny_bert.task("markers-z")


def test_a_declared_task_has_no_data_until_bound():
    declared = SUITES.get("tiny").task("markers-a")
    assert declared.data is None and declared.classes == ("a0", "a1", "a2")
    with pytest.raises(LookupError, match="not bound"):
        declared.head()
    bound = declared.bind(StubData())
    assert bound.data is not None and declared.data is None  # binding makes a copy
    assert isinstance(bound.head(), nn.Identity)


def test_declared_tasks_of_a_class_and_of_an_instance(tmp_path):
    assert [t.name for t in declared_tasks(BACKBONES.get("mamba-130m"))] == list(BACKBONES.get("mamba-130m").task_names)
    stub = StubBackbone(tmp_path, tensors(a=[1.0]), {"t1": tensors(a=[2.0])})
    assert declared_tasks(stub) is stub.tasks  # an unregistered backbone's tasks are its own


# --- capabilities ---------------------------------------------------------------------------
class _NeedsClassDistribution(Method):
    name = "test-needs-classes"
    requires = frozenset({CLASS_DISTRIBUTION})

    def merge(self, pool, exemplars=None):
        return StaticMerged(pool.backbone, pool.pretrained_state())


def test_capabilities_of_the_kinds_of_task():
    glue, rf100 = SUITES.get("glue"), SUITES.get("rf100")
    assert glue.task("cola").capabilities == {OUTPUT_PER_INPUT, CLASS_DISTRIBUTION}
    assert glue.task("stsb").capabilities == {OUTPUT_PER_INPUT}  # one score per input, no classes
    assert all(not task.capabilities for task in rf100.tasks)


def test_a_method_needing_class_distributions_is_not_applicable_to_rf100_nor_to_glue_sts_b():
    method = _NeedsClassDistribution()
    method.check_applicable(BACKBONES.get("tiny-bert"))
    method.check_applicable(BACKBONES.get("mamba-130m"))  # no STS-B
    with pytest.raises(NotApplicableError, match="not applicable to backbone 'detr-r50'.*class_distribution"):
        method.check_applicable(BACKBONES.get("detr-r50"))
    with pytest.raises(NotApplicableError, match="task stsb"):
        method.check_applicable(BACKBONES.get("roberta-base"))


def test_the_methods_needing_one_output_per_input():
    needing = {name for name, cls in METHODS.items() if OUTPUT_PER_INPUT in cls.requires}
    assert needing == {"adamerging", "adamerging++", "fisher"}
    for name in needing:
        with pytest.raises(NotApplicableError, match=re.escape(f"method {name!r} is not applicable to backbone 'detr-r50'")):
            METHODS.get(name)().check_applicable(BACKBONES.get("detr-r50"))
        METHODS.get(name)().check_applicable(BACKBONES.get("roberta-base"))  # STS-B's one score is such an output


# --- routing --------------------------------------------------------------------------------
def test_detection_tasks_route_by_their_object_queries():
    aerial = SUITES.get("rf100").task("aerial")
    features = torch.randn(2, 5, 32 + 4)  # decoder state and box of each of 5 queries
    assert aerial.routes_by_parts
    assert torch.equal(aerial.routing_features(features), features[..., :32])
    cola = SUITES.get("glue").task("cola")
    assert not cola.routes_by_parts and cola.routing_features(torch.ones(2, 3, 4)).shape == (2, 12)


def test_one_router_cannot_serve_tasks_that_read_inputs_differently():
    mixed = [SUITES.get("glue").task("cola"), SUITES.get("rf100").task("aerial")]
    with pytest.raises(ValueError, match="read routing features differently"):
        routing_view(mixed)
    with pytest.raises(ValueError, match="differently"):
        Suite("mixed", mixed, StubData)


# --- a new kind of task ---------------------------------------------------------------------
OUTPUT_PER_PIXEL = "output_per_pixel"


class SegmentationTask(Task):
    """A kind of task no method knows: per-pixel class logits, scored by pixel accuracy."""

    capabilities = frozenset({OUTPUT_PER_PIXEL})

    def __init__(self, name: str):
        super().__init__(name, ("background", "thing"), metric="pixel-accuracy", outputs="segmentation")

    def score(self, outputs, targets):
        predictions = torch.cat([output.argmax(1) for output in outputs])
        return float((predictions == torch.cat(targets)).float().mean())


class PixelData(StubData):
    def head(self, task):
        return nn.Identity()

    def batches(self, task, split, batch_size):
        logits = torch.zeros(2, 2, 3, 3)
        logits[:, 1, 0] = 1.0  # the first row of every image is "thing"
        target = torch.zeros(2, 3, 3, dtype=torch.long)
        target[:, 0] = 1
        target[1, 2, 2] = 1  # one pixel the model misses
        yield {"x": logits}, target


class _PixelEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))  # the stub's integer buffer

    def forward(self, x):
        return x + self.a


class _NeedsPixels(_NeedsClassDistribution):
    name = "test-needs-pixels"
    requires = frozenset({OUTPUT_PER_PIXEL})


@pytest.fixture
def segmentation(monkeypatch, tmp_path):
    """A suite and a backbone of a new kind of task, registered for the test only."""
    BACKBONES.names()
    monkeypatch.setattr(SUITES, "_items", dict(SUITES._items))
    monkeypatch.setattr(BACKBONES, "_items", dict(BACKBONES._items))
    register_suite(Suite("segmentation-test", [SegmentationTask("cells"), SegmentationTask("roads")],
                         lambda backbone: PixelData()))

    class Segmenter(StubBackbone):
        suite = "segmentation-test"
        task_names = ("cells", "roads")

        def __init__(self, root):
            super().__init__(root, {"a": torch.zeros(1)}, {"cells": {"a": torch.ones(1)}, "roads": {"a": torch.ones(1)}})
            del self.tasks  # the suite's tasks, bound to its data

        def build_encoder(self):
            return _PixelEncoder()

    BACKBONES.register("segmenter-test")(Segmenter)
    return Segmenter(tmp_path)


def test_a_new_kind_of_task_is_handled_without_touching_methods(segmentation):
    cls = type(segmentation)
    _NeedsPixels().check_applicable(cls)
    METHODS.get("task-arithmetic")().check_applicable(cls)  # requires nothing
    for name in ("adamerging", "fisher"):
        with pytest.raises(NotApplicableError, match=f"method {name!r} is not applicable"):
            METHODS.get(name)().check_applicable(cls)
    assert isinstance(segmentation.task("cells"), SegmentationTask)
    with ModelPool(segmentation) as pool:
        merged = METHODS.get("pretrained")().merge(pool)
        metrics = evaluate(merged, segmentation.tasks)
    assert metrics == {"cells": pytest.approx(17 / 18), "roads": pytest.approx(17 / 18)}
