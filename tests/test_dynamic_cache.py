"""The composed-weight cache of dynamic methods holds at most its byte budget, evicts the
least recently used weight set first, and never changes a prediction: a budget too small
for one set gives the numbers of the default budget."""
from __future__ import annotations

import pytest
import torch

from mergebench.errors import HyperparameterError
from mergebench.evaluate import evaluate
from mergebench.runner import load_pool, make_method, resolve, run


@pytest.fixture(scope="module")
def merged(tiny_bert):
    with load_pool(tiny_bert, [task.name for task in tiny_bert.tasks]) as pool:
        yield make_method("t-switch").merge(pool)


def set_bytes(merged) -> int:
    """One composed weight set: every tensor a switch changes, in float32."""
    return sum(4 * merged.pretrained[key].numel() for key in merged.store.keys())


def test_the_cache_stays_within_its_budget_and_evicts_the_least_recently_used(merged):
    one = set_bytes(merged)
    merged.clear_cache()
    merged.cache_bytes = 2 * one + one // 2  # room for two sets
    vectors = {name: torch.tensor(values) for name, values in
               {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0], "mix": [0.5, 0.5, 0.0]}.items()}
    built = merged.materialisations

    def ask(name):
        merged.merged_parameters(vectors[name])
        assert merged.cache_used <= merged.cache_bytes
        return merged.materialisations - built

    assert [ask("a"), ask("b"), ask("a")] == [1, 2, 2]  # a is served from the cache
    assert ask("c") == 3 and merged.cache_used == 2 * one  # b, the least recently used, made room
    assert ask("a") == 3  # kept
    assert ask("b") == 4  # evicted: built again
    merged.cache_bytes = one  # shrinking the budget evicts at once
    assert merged.cache_used == one
    assert ask("mix") == 5 and merged.cache_used == one


def test_a_budget_too_small_for_one_set_changes_no_prediction(tiny_bert, merged):
    merged.clear_cache()
    merged.cache_bytes = 2 * 1024**3
    task = tiny_bert.tasks[0]
    inputs, _ = next(iter(task.batches("test", 32)))
    expected = merged.predict(task.name, inputs)
    metrics = evaluate(merged, tiny_bert.tasks, 32)
    merged.cache_bytes = set_bytes(merged) - 1
    built = merged.materialisations
    assert torch.equal(merged.predict(task.name, inputs), expected)
    assert evaluate(merged, tiny_bert.tasks, 32) == metrics
    assert merged.cache_used == 0 and merged.materialisations - built == 1 + 3 * 3  # every batch builds its set


def test_cache_mb_reaches_the_run(tiny_bert):
    with pytest.raises(HyperparameterError, match=r"--cache-mb -1 is not allowed"):
        resolve("t-switch", "tiny-bert", cache_mb=-1)
    assert resolve("t-switch", "tiny-bert", cache_mb=0.5).cache_mb == 0.5
    default = run("t-switch", "tiny-bert", results_dir=None)
    tiny = run("t-switch", "tiny-bert", results_dir=None, cache_mb=0)
    assert tiny.metrics == default.metrics
