"""FlexSwitch and Auto-FlexSwitch store their switches in the layout ``format`` names: the same
trained switch (one cache entry) in sass and in ans decodes to the same values and predicts
the same, and the storage counted is that of the files written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mergebench
from mergebench.container import decode_tensors
from mergebench.errors import HyperparameterError
from mergebench.exemplars import draw_exemplars
from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests.test_export import run_and_save

HP = {"steps": 3, "exemplars": 8, "batch_size": 4, "lr_bas": 0.3}  # settings no other test uses: trained once here


@pytest.fixture(scope="module")
def merged_both(tiny_bert):
    """FlexSwitch merged in sass (training), then in ans and Auto-FlexSwitch in ans (both reusing it)."""
    tasks = [t.name for t in tiny_bert.tasks]
    exemplars = draw_exemplars(tiny_bert, tasks, HP["exemplars"], 0)
    with ModelPool(tiny_bert, tasks) as pool:
        sass = make_method("flexswitch", HP).merge(pool, exemplars)
        ans = make_method("flexswitch", {**HP, "format": "ans"}).merge(pool, exemplars)
        auto = make_method("auto-flexswitch", {**HP, "format": "ans", "centres": 2, "rank": 2, "metric_epochs": 2,
                                               "neighbours": 3}).merge(pool, exemplars)
        rebuilt = make_method("flexswitch", {**HP, "format": "ans"}).rebuild(pool, ans.artifacts())
    return tasks, sass, ans, auto, rebuilt


def test_the_format_does_not_change_the_training_it_reuses(merged_both):
    tasks, sass, ans, auto, _ = merged_both
    assert not any(d["reused"] for d in sass.diagnostics()["flexswitch"].values())
    assert all(d["reused"] for d in ans.diagnostics()["flexswitch"].values())
    assert all(auto.diagnostics()["flexswitch"][task]["reused"] for task in tasks)
    assert sorted(sass.artifacts()) == sorted(f"{task}.sass" for task in tasks)
    assert sorted(ans.artifacts()) == sorted(f"{task}.ans" for task in tasks)
    assert sorted(auto.artifacts()) == sorted([*(f"{task}.ans" for task in tasks), "router.mbc"])


def test_ans_holds_the_same_masks_codes_and_values_as_sass(merged_both):
    tasks, sass, ans, auto, _ = merged_both
    for task in tasks:
        plain = decode_tensors(sass.artifacts()[f"{task}.sass"])
        coded = decode_tensors(ans.artifacts()[f"{task}.ans"])
        assert list(plain) == list(coded) and len(plain) > 0
        assert {t.fmt for t in plain.values()} == {"sass"} and {t.fmt for t in coded.values()} == {"ans"}
        bits = set()
        for key in plain:
            a, b = plain.compressed(key), coded.compressed(key)
            assert a.shape == b.shape and a.bits == b.bits and a.params == b.params
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.codes, b.codes)
            assert np.array_equal(a.to_numpy(), b.to_numpy())
            bits.add(b.bits)
        assert bits <= {1, 2, 4, 8}
        # Auto-FlexSwitch stores the very same ans bytes for the same reused switch
        assert auto.artifacts()[f"{task}.ans"] == ans.artifacts()[f"{task}.ans"]
    assert any(decode_tensors(ans.artifacts()[f"{t}.ans"]).compressed(k).n_kept > 0
               for t in tasks for k in decode_tensors(ans.artifacts()[f"{t}.ans"]))


def test_ans_predicts_exactly_as_sass_and_is_counted_by_its_own_bytes(tiny_bert, merged_both):
    tasks, sass, ans, _, rebuilt = merged_both
    for task in tasks:
        inputs, _ = next(iter(tiny_bert.task(task).batches("test", 24)))
        expected = sass.predict(task, inputs)
        assert torch.equal(ans.predict(task, inputs), expected)
        assert torch.equal(rebuilt.predict(task, inputs), expected)
    assert ans.storage_bytes() == sum(len(blob) for blob in ans.artifacts().values())
    assert sass.storage_bytes() == sum(len(blob) for blob in sass.artifacts().values())
    assert ans.storage_bytes() != sass.storage_bytes()


def test_an_exported_ans_flexswitch_reloads_and_predicts_the_same(tiny_bert, tmp_path):
    out = tmp_path / "flex-ans"
    result, merged = run_and_save("flexswitch", out, **HP, format="ans")
    assert result.hyperparameters["format"] == "ans"
    files = sorted((out / "artifacts").iterdir())
    assert [p.name for p in files] == sorted(f"{task}.ans" for task in tiny_bert.task_names)
    assert result.extra_storage_bytes == sum(p.stat().st_size for p in files)
    assert json.loads((out / "mergebench.json").read_text())["hyperparameters"]["format"] == "ans"
    loaded = mergebench.load(out)
    for task in tiny_bert.task_names:
        inputs, _ = next(iter(tiny_bert.task(task).batches("test", 32)))
        assert torch.equal(loaded(task=task, **inputs), merged.predict(task, inputs))


def test_a_format_that_cannot_hold_b_bit_values_is_refused():
    with pytest.raises(HyperparameterError, match="format"):
        make_method("flexswitch", {"format": "tswitch"})
