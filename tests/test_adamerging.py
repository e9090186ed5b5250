"""AdaMerging / AdaMerging++ on hand-sized models: the 3-tensor stub of tests/_stub.py
(merge arithmetic) and the nn.Linear(3, 2) encoder with a fixed 3-class head of
tests/test_fisher.py (entropy objective, gradients)."""
from __future__ import annotations

import pytest
import torch

from mergebench.methods.adamerging import AdaMergingModel, softmax_entropy, stacked_task_vectors
from mergebench.runner import make_method
from tests._stub import finetuned_from, make_pool, merged_state, tensors
from tests.test_fisher import HEAD3, T1, T2, X1, X2, B, W, linear_pool

PRE = tensors(a=[1.0, 1.0, 1.0, 1.0], b=[0.0, 0.0], c=[2.0])
TAU1 = tensors(a=[1.0, -2.0, 0.5, 3.0], b=[0.1, -0.2], c=[4.0])
TAU2 = tensors(a=[-1.5, -1.0, 0.2, 2.0], b=[0.3, 0.4], c=[-5.0])
EXEMPLARS = {"t1": {"x": X1}, "t2": {"x": X2}}


@pytest.fixture
def pool(tmp_path):
    with make_pool(tmp_path, PRE, finetuned_from(PRE, TAU1, TAU2)) as pool:
        yield pool


@pytest.fixture
def linear(tmp_path):
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}, HEAD3) as pool:
        yield pool


def entropy_by_hand(state) -> float:
    """sum over tasks of the mean entropy of softmax(HEAD3 (W x + b)) on all its inputs."""
    total = 0.0
    for x in (X1, X2):
        p = torch.softmax((x @ state[W].T + state[B]) @ HEAD3.T, -1)
        total += float(-(p * p.log()).sum(-1).mean())
    return total


@pytest.mark.parametrize("name", ["adamerging", "adamerging++"])
def test_flags_and_defaults(name):
    method = make_method(name)
    assert method.needs_exemplars and method.uses_test_inputs
    assert not method.uses_task_identity and not method.dynamic
    assert method.exemplars_per_task == 256
    hp = method.hparams
    assert (hp["steps"], hp["batch_size"], hp["lr"], hp["init"], hp["clamp"]) == (500, 16, 1e-3, 0.3, True)  # the authors' protocol
    assert hp.get("keep") == (0.2 if name == "adamerging++" else None)


@pytest.mark.parametrize("init", [0.3, 0.45])
def test_zero_steps_is_task_arithmetic_with_init(pool, init):
    ada = merged_state(make_method("adamerging", {"steps": 0, "init": init}).merge(pool))
    ta = merged_state(make_method("task-arithmetic", {"scaling": init}).merge(pool))
    for key in PRE:
        assert torch.allclose(ada[key], ta[key])
    assert ada["count"].item() == 7  # integer buffers keep their pretrained value


def test_plusplus_learns_on_trimmed_elected_vectors(pool):
    # keep=0.5 of 7 entries: threshold 1.0 for both tasks (see test_static_methods), so
    # trimmed tau1: a=[1,-2,0,3] b=[0,0] c=[4];  tau2: a=[-1.5,-1,0,2] b=[0,0] c=[-5]
    # elected signs a=[-,-,*,+] c=[-]: selected1 a=[0,-2,0,3] c=[0]; selected2 unchanged.
    # With lambda = 1 the merge is pre + selected1 + selected2 (a sum, not TIES' mean).
    state = merged_state(make_method("adamerging++", {"steps": 0, "init": 1.0, "keep": 0.5}).merge(pool))
    assert torch.allclose(state["a"], PRE["a"] + torch.tensor([-1.5, -3.0, 0.0, 5.0]))
    assert torch.allclose(state["b"], PRE["b"])
    assert torch.allclose(state["c"], PRE["c"] + torch.tensor([-5.0]))
    plain = merged_state(make_method("adamerging", {"steps": 0, "init": 1.0}).merge(pool))
    assert not torch.allclose(plain["a"], state["a"])  # trimming changes the result


def test_plusplus_keep_all_with_agreeing_signs_is_plain(tmp_path):
    tau2 = {k: 3 * v for k, v in TAU1.items()}
    with make_pool(tmp_path, PRE, finetuned_from(PRE, TAU1, tau2)) as pool:
        pp = merged_state(make_method("adamerging++", {"steps": 0, "keep": 1.0}).merge(pool))
        plain = merged_state(make_method("adamerging", {"steps": 0}).merge(pool))
    for key in PRE:
        assert torch.allclose(pp[key], plain[key])


def test_coefficients_shape_and_gradients_reach_them_only(linear):
    model = AdaMergingModel(linear, stacked_task_vectors(linear), init=0.3, clamp=True)
    assert model.coefficients.shape == (2, len(linear.merged_keys)) == (2, 2)
    loss = model.entropy(EXEMPLARS)
    assert torch.isclose(loss, torch.tensor(entropy_by_hand(model.merged_state())), atol=1e-6)
    loss.backward()
    grad = model.coefficients.grad
    assert grad is not None and grad.shape == (2, 2) and torch.isfinite(grad).all()
    assert (grad.abs() > 0).all()
    assert all(p.grad is None for p in model.encoder.parameters())
    # the gradient is that of the entropy w.r.t. lambda: compare one entry with finite differences
    eps = 1e-3
    with torch.no_grad():
        model.coefficients[0, 0] += eps
        up = float(model.entropy(EXEMPLARS))
        model.coefficients[0, 0] -= 2 * eps
        down = float(model.entropy(EXEMPLARS))
    assert abs((up - down) / (2 * eps) - float(grad[0, 0])) < 1e-3


def test_entropy_decreases_and_coefficients_stay_in_unit_interval(linear):
    start = entropy_by_hand(merged_state(make_method("adamerging", {"steps": 0}).merge(linear)))
    merged = make_method("adamerging", {"steps": 30, "lr": 0.05, "batch_size": 8}).merge(linear, EXEMPLARS)
    end = entropy_by_hand(merged_state(merged))
    assert end < start - 1e-3
    learned = merged.diagnostics()
    assert learned["entropy"]["last_step"] < learned["entropy"]["first_step"]
    table = torch.tensor([learned["coefficients_per_tensor"][task] for task in linear.tasks])
    assert table.shape == (2, 2) and (table >= 0).all() and (table <= 1).all()
    for task, row in zip(linear.tasks, table):  # the per-task summary of the same coefficients
        assert learned["coefficients"][task] == {"mean": float(row.mean()), "min": float(row.min()), "max": float(row.max())}


def test_batches_are_seeded(linear):
    hp = {"steps": 3, "lr": 0.05, "batch_size": 2}
    first = make_method("adamerging", hp, seed=1).merge(linear, EXEMPLARS)
    again = make_method("adamerging", hp, seed=1).merge(linear, EXEMPLARS)
    other = make_method("adamerging", hp, seed=2).merge(linear, EXEMPLARS)
    assert torch.equal(merged_state(first)[W], merged_state(again)[W])
    assert not torch.equal(merged_state(first)[W], merged_state(other)[W])


def test_softmax_entropy_units():
    assert torch.allclose(softmax_entropy(torch.zeros(2, 4)), torch.full((2,), float(torch.log(torch.tensor(4.0)))))
    assert softmax_entropy(torch.tensor([[100.0, 0.0]])).item() < 1e-6


def test_needs_exemplars_and_valid_hyperparameters(linear):
    with pytest.raises(ValueError, match="needs exemplars"):
        make_method("adamerging").merge(linear)
    with pytest.raises(ValueError, match="no exemplars for task 't2'"):
        make_method("adamerging++").merge(linear, {"t1": {"x": X1}})
    with pytest.raises(ValueError, match="keep"):
        make_method("adamerging++", {"keep": 0.0, "steps": 0}).merge(linear)
    with pytest.raises(ValueError, match="batch_size"):
        make_method("adamerging", {"batch_size": 0}).merge(linear, EXEMPLARS)
