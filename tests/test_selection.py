"""``mergebench sweep --select-on validation``: grid points scored on a seeded split of the
training data, never the test split (checked by construction: reading a test batch during
selection raises), the best one evaluated on the test split and recorded as tuned."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mergebench.selection as selection_module
from mergebench.cli import main
from mergebench.errors import HyperparameterError, NotApplicableError, RecordError
from mergebench.results import Result, iter_records
from mergebench.registry import BACKBONES
from mergebench.selection import validation_batches, validation_split
from mergebench.sweep import plan_selection, plan_sweep, result_key, run_selection
from mergebench.table import results_table
from mergebench.task import Task, TaskData
from mergebench.tasks._text_classification import TextTaskData
from mergebench.tasks.tiny import TASKS, TinyBert


@pytest.fixture
def test_split_guard(monkeypatch):
    """Counts test-split reads; while ``armed``, reading a test batch raises."""
    state = {"armed": False, "test_reads": 0}
    original = TextTaskData.batches

    def batches(self, task, split, batch_size):
        if split == "test":
            if state["armed"]:
                raise AssertionError(f"selection read the test split of {task}")
            state["test_reads"] += 1
        return original(self, task, split, batch_size)

    monkeypatch.setattr(TextTaskData, "batches", batches)
    real_select = selection_module.select

    def guarded_select(*args, **kwargs):
        state["armed"] = True
        try:
            return real_select(*args, **kwargs)
        finally:
            state["armed"] = False

    monkeypatch.setattr(selection_module, "select", guarded_select)
    return state


def test_selection_never_reads_test_labels_and_records_the_chosen_point(tiny_bert, tmp_path, test_split_guard):
    grid = {"scaling": [0.1, 0.3, 1.0]}
    groups = plan_selection(plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], grid), grid, 60, 7)
    assert len(groups) == 1 and len(groups[0].configurations) == 3
    report = run_selection(groups, tmp_path, progress=False)
    assert not report.failed, report.failed
    assert test_split_guard["test_reads"] == 3  # only the chosen point's final evaluation, once per task
    (result,) = [r for _, r in iter_records(tmp_path)]
    chosen = result.selection
    assert chosen["on"] == "validation" and chosen["size"] == 60 and chosen["seed"] == 7
    assert chosen["split"] == "train" and "sizes" not in chosen  # tiny ships no validation split: carved
    assert chosen["grid"] == {"scaling": [0.1, 0.3, 1.0]}
    best = max(chosen["points"], key=lambda p: p["validation_average"])
    assert result.hyperparameters["scaling"] == best["hyperparameters"]["scaling"]
    assert chosen["validation_average"] == best["validation_average"]
    assert result_key(result) == groups[0].key
    assert run_selection(groups, tmp_path, progress=False).skipped == 1  # a rerun resumes: nothing new
    assert "tuned on validation (60 per task)" in results_table([result])


def test_validation_batches_are_a_seeded_subset_of_the_training_split(tiny_bert):
    task = tiny_bert.task("markers-a")
    train = [(ids, label) for inputs, targets in task.batches("train", 16)
             for ids, label in zip(inputs["input_ids"].tolist(), targets.tolist())]
    first = list(validation_batches(task, 50, 3, 16))
    again = list(validation_batches(task, 50, 3, 16))
    rows = [(ids, label) for inputs, targets in first for ids, label in zip(inputs["input_ids"].tolist(), targets.tolist())]
    assert len(rows) == 50
    assert rows == [(ids, label) for inputs, targets in again
                    for ids, label in zip(inputs["input_ids"].tolist(), targets.tolist())]
    assert all(row in train for row in rows)
    other = [ids for inputs, _ in validation_batches(task, 50, 4, 16) for ids in inputs["input_ids"].tolist()]
    assert other != [ids for ids, _ in rows]
    with pytest.raises(HyperparameterError, match="training examples"):
        list(validation_batches(task, len(train) + 1, 0, 16))


class _OpaqueData(TaskData):
    def head(self, task):
        raise NotImplementedError

    def batches(self, task, split, batch_size):
        yield "not a mapping", torch.zeros(2)

    def exemplars(self, task, n, seed, split="train"):
        raise NotImplementedError


def test_a_suite_whose_batches_cannot_be_split_refuses_with_a_clear_message():
    task = Task("opaque", classes=("a", "b")).bind(_OpaqueData())
    with pytest.raises(NotApplicableError, match="no validation split; --select-on validation is not supported"):
        list(validation_batches(task, 1, 0))


def test_a_tuned_record_round_trips_and_a_bad_selection_is_refused():
    base = dict(method="m", backbone="b", suite="s", seed=0, hyperparameters={"scaling": 0.3},
                metrics={"t": 0.5}, average=0.5, extra_storage_bytes=0, merge_seconds=1.0, eval_seconds=1.0,
                peak_rss_bytes=1)
    untuned = json.loads(Result(**base).to_json())
    assert untuned.pop("selection") is None  # untuned: null; a record written before the field lacks it
    Result.from_dict(untuned).to_json()
    selection = {"on": "validation", "size": 10, "seed": 0, "grid": {"scaling": [0.1, 0.3]}, "validation_average": 0.7}
    tuned = Result.from_dict(json.loads(Result(**base, selection=selection).to_json()))
    assert tuned.selection == selection
    with pytest.raises(RecordError, match="selection.on"):
        Result(**base, selection={**selection, "on": "test"}).to_json()
    with pytest.raises(RecordError, match="selection.validation_average"):
        Result(**base, selection={**selection, "validation_average": None}).to_json()
    shipped = {**selection, "split": "validation", "sizes": {"t": 10}}
    assert Result.from_dict(json.loads(Result(**base, selection=shipped).to_json())).selection == shipped
    with pytest.raises(RecordError, match="selection.split: 'test' is not"):
        Result(**base, selection={**selection, "split": "test"}).to_json()
    with pytest.raises(RecordError, match="selection.sizes"):
        Result(**base, selection={**shipped, "sizes": {"t": 0}}).to_json()


def test_the_command_line_tunes_without_ray(tiny_bert, tmp_path, capsys, test_split_guard):
    results = tmp_path / "results"
    argv = ["sweep", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--grid", "scaling=0.1,1.0",
            "--select-on", "validation", "--validation-size", "40", "--results-dir", str(results)]
    assert main(argv) == 0
    (result,) = [r for _, r in iter_records(results)]
    assert result.selection["size"] == 40 and result.hyperparameters["scaling"] in (0.1, 1.0)
    assert main(argv) == 0
    assert len(list(iter_records(results))) == 1
    assert "0 recorded, 1 already recorded" in capsys.readouterr().err


def test_a_shipped_validation_split_is_scored_whole_and_alone(tiny_bert, tmp_path, monkeypatch):
    """tiny-bert given a validation split of its own, as the mini suite ships one: selection
    reads exactly its examples, every one, and neither the training nor the test split."""
    counts = {"markers-a": 30, "markers-b": 33, "markers-c": 29}
    rng = np.random.default_rng(11)
    shipped = {}
    for task, markers in TASKS.items():
        labels = rng.integers(len(markers), size=counts[task])
        fillers = rng.integers(40, size=(counts[task], 5))
        shipped[task] = tuple((" ".join([*(f"w{i}" for i in row[:2]), markers[y], *(f"w{i}" for i in row[2:])]), int(y))
                              for row, y in zip(fillers, labels))
    real_data = TinyBert.data
    monkeypatch.setattr(TinyBert, "data", lambda self, task: dataclasses.replace(real_data(self, task),
                                                                                 validation=shipped[task]))
    reads, armed = [], [False]
    real_batch = TextTaskData.batch

    def batch(self, task, split, start, stop):
        if armed[0]:
            reads.append((task, split, self.backbone.examples(task, split)[start:stop]))
        return real_batch(self, task, split, start, stop)

    monkeypatch.setattr(TextTaskData, "batch", batch)
    real_select = selection_module.select

    def armed_select(*args, **kwargs):
        armed[0] = True
        try:
            return real_select(*args, **kwargs)
        finally:
            armed[0] = False

    monkeypatch.setattr(selection_module, "select", armed_select)
    grid = {"scaling": [0.2, 0.6]}
    (group,) = plan_selection(plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], grid), grid, 60, 7)
    assert group.selection["split"] == "validation" and group.selection["sizes"] == counts
    assert group.selection["size"] == 29  # the smallest task's
    report = run_selection([group], tmp_path, progress=False)
    assert not report.failed, report.failed
    assert {split for _, split, _ in reads} == {"validation"}
    for task in TASKS:  # each grid point scored every shipped example, in order, once
        seen = tuple(example for name, _, chunk in reads if name == task for example in chunk)
        assert seen == shipped[task] * 2
    (result,) = [r for _, r in iter_records(tmp_path)]
    assert result.selection["split"] == "validation" and result.selection["sizes"] == counts
    assert result_key(result) == group.key
    (again,) = plan_selection(plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], grid), grid, 29, 7)
    monkeypatch.setattr(TinyBert, "data", real_data)
    (carved,) = plan_selection(plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], grid), grid, 29, 7)
    assert carved.selection["split"] == "train" and carved.key != again.key  # the shipped split is in the key


def test_the_mini_suite_selects_on_the_validation_split_it_ships():
    backbone = BACKBONES.get("minilm-l6")()
    manifest = json.loads((Path(backbone.committed_data) / "manifest.json").read_text())
    sizes = {task: manifest["tasks"][task]["splits"]["validation"]["examples"] for task in backbone.task_names}
    assert min(sizes.values()) >= 500
    assert validation_split(backbone, backbone.task_names, 200) == {"split": "validation", "size": min(sizes.values()),
                                                                     "sizes": sizes}
