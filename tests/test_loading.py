"""Evaluation batches through a DataLoader: with worker processes the batches, the
predictions and the metrics are those of the in-order loop; the first-N cap reads only the
batches it needs; --num-workers is checked and reaches evaluation."""
from __future__ import annotations

import math

import pytest
import torch

from mergebench.cli import main
from mergebench.errors import HyperparameterError
from mergebench.evaluate import evaluate, evaluation_batches
from mergebench.loading import SplitBatches, default_workers
from mergebench.runner import load_pool, make_method, resolve, timed_evaluate


@pytest.fixture(scope="module")
def merged(tiny_bert):
    tasks = [task.name for task in tiny_bert.tasks]
    with load_pool(tiny_bert, tasks) as pool:
        yield make_method("task-arithmetic").merge(pool)


def predictions(merged, task, workers):
    out = []
    for inputs, targets in evaluation_batches(merged, task, 20, workers):
        out.append((merged.predict(task.name, inputs), targets))
    return out


def test_two_workers_give_the_predictions_of_the_in_order_loop(tiny_bert, merged):
    task = tiny_bert.tasks[0]
    plain = predictions(merged, task, 0)
    loaded = predictions(merged, task, 2)
    assert len(plain) == len(loaded) == math.ceil(96 / 20)  # tiny's test splits have 96 examples
    for (p_out, p_target), (l_out, l_target) in zip(plain, loaded):
        assert torch.equal(p_out, l_out) and torch.equal(p_target, l_target)
    assert evaluate(merged, tiny_bert.tasks, 20, workers=2) == evaluate(merged, tiny_bert.tasks, 20, workers=0)


def test_the_first_examples_cap_holds_with_workers(tiny_bert, merged):
    task = tiny_bert.tasks[1]
    capped = task.limited(45)
    batches = list(evaluation_batches(merged, capped, 20, 2))
    assert [len(targets) for _, targets in batches] == [20, 20, 5] and capped.test_scored == 45
    whole = [targets for _, targets in task.batches("test", 20)]
    assert torch.equal(torch.cat([targets for _, targets in batches]), torch.cat(whole)[:45])
    # the dataset of batches stops at the batch holding the 45th example
    assert len(SplitBatches(task.data, task.name, "test", 20, limit=45)) == 3


def test_default_workers():
    assert default_workers(torch.device("cpu")) == 0


def test_num_workers_is_checked_and_reaches_evaluation(tiny_bert, merged, monkeypatch):
    with pytest.raises(HyperparameterError, match=r"--num-workers -1 is not allowed"):
        resolve("task-arithmetic", "tiny-bert", workers=-1)
    assert resolve("task-arithmetic", "tiny-bert", workers=2).workers == 2
    seen = []
    import mergebench.evaluate as evaluate_module

    original = evaluate_module.evaluation_batches
    monkeypatch.setattr(evaluate_module, "evaluation_batches",
                        lambda m, t, b, workers=None: seen.append(workers) or original(m, t, b, workers))
    metrics, _ = timed_evaluate(merged, tiny_bert, [tiny_bert.tasks[0].name], 32, workers=2)
    assert seen == [2] and set(metrics) == {tiny_bert.tasks[0].name}
    assert main(["run", "--method", "pretrained", "--backbone", "tiny-bert", "--num-workers", "-2", "--no-save"]) != 0
