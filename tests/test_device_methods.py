"""Data-dependent methods run their forward/backward passes on the run's device under its
precision: the runner hands both to the method, the CPU gives bit-identical merges to a
method that was never given a device, every other device agrees with the CPU to rounding,
and a low precision really changes the forward passes (autocast is on) without moving the
result far."""
from __future__ import annotations

import pytest
import torch

from mergebench.exemplars import draw_exemplars
from mergebench.runner import load_pool, make_method, resolve, seed_everything
from tests._devices import device  # noqa: F401  (the fixture)

SMALL = {
    "fisher": {"exemplars": 2},
    "regmean": {"exemplars": 16},
    "adamerging": {"exemplars": 16, "steps": 3, "batch_size": 4},
}


@pytest.fixture(scope="module")
def pool_and_exemplars(tiny_bert):
    tasks = [task.name for task in tiny_bert.tasks]
    with load_pool(tiny_bert, tasks) as pool:
        yield pool, draw_exemplars(tiny_bert, tasks, 16, seed=0), draw_exemplars(tiny_bert, tasks, 16, 0, "test")


def merged_state(name, pool_and_exemplars, device=None, precision=None):
    pool, train, test = pool_and_exemplars
    method = make_method(name, SMALL[name], seed=0)
    if device is not None:
        method.device = torch.device(device)
    if precision is not None:
        method.precision = precision
    seed_everything(0)
    merged = method.merge(pool, test if method.uses_test_inputs else train)
    assert merged.device == torch.device("cpu")  # a Merged starts on the CPU; evaluation moves it
    return {key: value.detach().clone() for key, value in merged.encoder.state_dict().items()}


def test_the_runner_hands_the_method_its_device_and_precision(tiny_bert):
    plan = resolve("fisher", "tiny-bert", device="cpu", precision="bf16")
    assert (plan.method.device, plan.method.precision) == (torch.device("cpu"), "bf16")
    method = make_method("fisher")
    assert (method.device, method.precision) == (torch.device("cpu"), "fp32")  # never given one: the CPU, fp32


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_merge_on_each_device_matches_the_merge_without_a_device(pool_and_exemplars, device, name):
    reference = merged_state(name, pool_and_exemplars)
    here = merged_state(name, pool_and_exemplars, device)
    assert reference.keys() == here.keys()
    for key, value in reference.items():
        assert here[key].device.type == "cpu" and here[key].dtype == value.dtype, key
        if device.type == "cpu":
            assert torch.equal(here[key], value), key  # the CPU path is the one without a device, bit for bit
        else:
            torch.testing.assert_close(here[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_changes_the_forward_passes_but_not_much(pool_and_exemplars, name):
    fp32 = merged_state(name, pool_and_exemplars)
    bf16 = merged_state(name, pool_and_exemplars, "cpu", "bf16")
    differences = [float((bf16[key].float() - fp32[key].float()).abs().max()) for key in fp32]
    scales = [float(fp32[key].float().abs().max()) for key in fp32]
    assert max(differences) > 0  # autocast was on for the forward passes
    # bf16 has 8 mantissa bits: each tensor stays within a few per cent of its own scale
    assert all(d <= 0.05 * max(s, 1e-3) for d, s in zip(differences, scales)), max(differences)


def test_auto_switch_query_features_on_each_device(pool_and_exemplars, device, tiny_bert):
    """The averaged query model's features are computed on the device, and its weights follow
    the encoder when evaluation moves the model."""
    pool, train, _ = pool_and_exemplars
    batch, _ = next(iter(tiny_bert.tasks[0].batches("test", 16)))
    outputs = []
    for where in (None, device):
        method = make_method("auto-switch", {"exemplars": 10, "query_model": "averaged"})
        if where is not None:
            method.device = where
        merged = method.merge(pool, train)
        outputs.append((merged.artifacts()["query_set.mbc"], merged.to(device).predict(
            tiny_bert.tasks[0].name, {k: v.to(device) for k, v in batch.items()}).cpu()))
    (query_cpu, out_cpu), (query_here, out_here) = outputs
    if device.type == "cpu":
        assert query_cpu == query_here and torch.equal(out_cpu, out_here)
    else:
        torch.testing.assert_close(out_here, out_cpu, rtol=1e-4, atol=1e-4)


def test_evaluation_on_each_device_matches_the_cpu(pool_and_exemplars, device, tiny_bert):
    from mergebench.evaluate import evaluate

    pool, _, _ = pool_and_exemplars
    merged = make_method("task-arithmetic").merge(pool)
    on_cpu = evaluate(merged, tiny_bert.tasks, 32)
    here = evaluate(merged.to(device), tiny_bert.tasks, 32, workers=0)
    assert here == on_cpu if device.type == "cpu" else all(abs(here[t] - on_cpu[t]) <= 0.011 for t in here)
