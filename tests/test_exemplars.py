"""Exemplar handling shared by the data-driven methods: checks, slicing, batched features."""
from __future__ import annotations

import pytest
import torch

from mergebench.exemplars import batched_features, example_count, per_task_features, task_exemplars, task_indices


def encoder(x, scale):
    return x * scale


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_features_equal_one_forward_and_pass_non_tensors_through(batch_size):
    inputs = {"x": torch.arange(10.0).view(5, 2), "scale": 2.0}
    assert torch.equal(batched_features(encoder, inputs, batch_size), inputs["x"] * 2.0)


def test_batched_features_record_no_gradient():
    weight = torch.ones(2, requires_grad=True)
    features = batched_features(lambda x: x * weight, {"x": torch.ones(3, 2)})
    assert not features.requires_grad


def test_per_task_features_and_their_task_indices():
    exemplars = {"a": {"x": torch.ones(2, 1)}, "b": {"x": torch.zeros(3, 1)}}
    groups = per_task_features(lambda x: x + 1, exemplars, ["b", "a"])
    assert [g.tolist() for g in groups] == [[[1.0]] * 3, [[2.0]] * 2]
    assert task_indices(groups).tolist() == [0, 0, 0, 1, 1]


def test_exemplar_checks_name_the_method_and_task():
    assert example_count({"x": torch.ones(4, 2), "mask": torch.ones(4), "flag": True}) == 4
    with pytest.raises(ValueError, match="one leading"):
        example_count({"x": torch.ones(4, 2), "y": torch.ones(3)})
    with pytest.raises(ValueError, match="method 'm' needs exemplars"):
        task_exemplars("m", None, "t")
    with pytest.raises(ValueError, match="no exemplars for task 't'"):
        task_exemplars("m", {"u": {"x": torch.ones(1)}}, "t")
    with pytest.raises(ValueError, match="exemplars of task 't' are empty"):
        task_exemplars("m", {"t": {"x": torch.ones(0)}}, "t")
