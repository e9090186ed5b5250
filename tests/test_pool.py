"""ModelPool over the prepared tiny-bert checkpoints, and its checkpoint validation."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergebench.pool import CheckpointError, ModelPool
from mergebench.tasks.tiny import TASKS, TinyBert
from tests._stub import StubBackbone, tensors

TASK = "markers-b"  # the task whose checkpoint the error tests replace


class PatchedTinyBert(TinyBert):
    """tiny-bert whose fine-tuned checkpoint of some tasks is a file a test wrote."""

    def __init__(self, root: Path, replaced: dict[str, Path]):
        super().__init__(root)
        self.replaced = replaced

    def finetuned_checkpoint(self, task: str) -> Path:
        if task in self.replaced:
            return self.replaced[task]
        return super().finetuned_checkpoint(task)


@pytest.fixture
def pool(tiny_bert):
    with ModelPool(tiny_bert) as pool:
        yield pool


def patched_pool(tiny_bert, path: Path) -> ModelPool:
    return ModelPool(PatchedTinyBert(tiny_bert.root, {TASK: path}))


def test_pool_tasks_are_the_suite_in_order(pool):
    assert pool.tasks == list(TASKS)
    assert pool.keys() == sorted(pool.keys())
    assert len(pool.keys()) > 10


def test_task_vector_is_finetuned_minus_pretrained(pool, tiny_bert_finetuned_state):
    key = "model.encoder.layer.0.attention.self.query.weight"
    assert key in pool.merged_keys
    for task in TASKS:
        finetuned = tiny_bert_finetuned_state(task)[key]
        tau = pool.task_vector(task, key)
        assert torch.equal(tau, finetuned - pool.pretrained(key))
        assert tau.abs().max() > 0  # fine-tuning moved this tensor
        assert torch.equal(pool.finetuned(task, key), finetuned)
    taus = pool.task_vectors(key)
    assert len(taus) == len(TASKS)
    for task, tau in zip(TASKS, taus):
        assert torch.equal(tau, pool.task_vector(task, key))
    assert not torch.equal(taus[0], taus[1])  # different tasks, different task vectors


def test_pretrained_state_matches_a_fresh_encoder(pool, tiny_bert):
    state = pool.pretrained_state()
    encoder = tiny_bert.build_encoder()
    encoder.load_state_dict(state, strict=True)  # same keys and shapes as the module
    fresh = tiny_bert.build_encoder().state_dict()  # seeded "pretrained" init
    for key, value in state.items():
        assert torch.equal(value, fresh[key]), key


def test_merged_keys_are_exactly_the_floating_point_tensors(pool):
    floating = [k for k in pool.keys() if pool.pretrained(k).is_floating_point()]
    assert pool.merged_keys == floating
    assert "model.embeddings.word_embeddings.weight" in pool.merged_keys


def test_integer_buffers_are_not_merged(tmp_path):
    pre = tensors(a=[1.0, 2.0], b=[0.5])
    fine = {"t1": tensors(a=[2.0, 2.0], b=[0.0])}
    with ModelPool(StubBackbone(tmp_path, pre, fine)) as pool:
        assert pool.keys() == ["a", "b", "count"]
        assert pool.merged_keys == ["a", "b"]
        assert torch.equal(pool.task_vector("t1", "a"), torch.tensor([1.0, 0.0]))


def test_finetuned_state_is_the_whole_checkpoint(pool, tiny_bert_finetuned_state):
    state = pool.finetuned_state("markers-c")
    expected = tiny_bert_finetuned_state("markers-c")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_unknown_task_is_a_clear_error(pool):
    with pytest.raises(KeyError, match="'markers-z' is not in the pool; tasks: markers-a, markers-b, markers-c"):
        pool.finetuned("markers-z", pool.keys()[0])


def test_checkpoint_paths(pool, tiny_bert):
    paths = pool.checkpoint_paths()
    assert list(paths) == list(TASKS)
    assert all(p == tiny_bert.finetuned_checkpoint(t) and p.is_file() for t, p in paths.items())


def test_a_valid_replacement_checkpoint_loads(tiny_bert, tiny_bert_finetuned_state, write_checkpoint):
    path = write_checkpoint(tiny_bert_finetuned_state(TASK), "copy.safetensors")
    with patched_pool(tiny_bert, path) as pool:
        key = pool.merged_keys[0]
        assert torch.equal(pool.finetuned(TASK, key), tiny_bert_finetuned_state(TASK)[key])


# --- bad checkpoints -----------------------------------------------------------------


def assert_checkpoint_error(tiny_bert, path: Path, *fragments: str) -> str:
    with patched_pool(tiny_bert, path) as pool:
        key = pool.merged_keys[0]
        assert pool.task_vector("markers-a", key) is not None  # the other tasks are untouched
        with pytest.raises(CheckpointError) as info:
            pool.task_vector(TASK, key)
        # every access to the bad task keeps failing (no half-validated handle is cached)
        with pytest.raises(CheckpointError):
            pool.task_vectors(key)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_key(tiny_bert, tiny_bert_finetuned_state, write_checkpoint):
    key = "model.encoder.layer.1.output.dense.bias"
    path = write_checkpoint(tiny_bert_finetuned_state(TASK), "missing.safetensors", drop=[key])
    assert_checkpoint_error(tiny_bert, path, "missing", key)


def test_unexpected_key(tiny_bert, tiny_bert_finetuned_state, write_checkpoint):
    path = write_checkpoint(
        tiny_bert_finetuned_state(TASK), "extra.safetensors", replace={"classifier.weight": torch.zeros(2, 2)}
    )
    assert_checkpoint_error(tiny_bert, path, "unexpected", "classifier.weight")


def test_wrong_shape(tiny_bert, tiny_bert_finetuned_state, write_checkpoint):
    key = "model.encoder.layer.0.intermediate.dense.weight"
    state = tiny_bert_finetuned_state(TASK)
    assert tuple(state[key].shape) == (64, 32)
    path = write_checkpoint(state, "shape.safetensors", replace={key: torch.zeros(64, 48)})
    message = assert_checkpoint_error(tiny_bert, path, repr(key), "[64, 48]", "[64, 32]")
    assert "shape" in message


def test_wrong_dtype(tiny_bert, tiny_bert_finetuned_state, write_checkpoint):
    key = "model.embeddings.LayerNorm.weight"
    state = tiny_bert_finetuned_state(TASK)
    path = write_checkpoint(state, "dtype.safetensors", replace={key: state[key].half()})
    assert_checkpoint_error(tiny_bert, path, repr(key), "F16", "F32")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values(tiny_bert, tiny_bert_finetuned_state, write_checkpoint, bad):
    key = "model.encoder.layer.1.attention.output.dense.weight"
    state = tiny_bert_finetuned_state(TASK)
    value = state[key].clone()
    value[3, 5] = bad
    path = write_checkpoint(state, "nan.safetensors", replace={key: value})
    assert_checkpoint_error(tiny_bert, path, repr(key), "NaN or infinite")


def test_truncated_file(tiny_bert, tmp_path):
    data = tiny_bert.finetuned_checkpoint(TASK).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert_checkpoint_error(tiny_bert, path, "cannot read checkpoint")


@pytest.mark.parametrize("content", [b"", b"\x00not a safetensors file" * 8, b"{}"])
def test_garbage_file(tiny_bert, tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    assert_checkpoint_error(tiny_bert, path, "cannot read checkpoint")


def test_missing_file(tiny_bert, tmp_path):
    path = tmp_path / "nowhere" / "markers-b.safetensors"
    assert_checkpoint_error(tiny_bert, path, "checkpoint not found")


def test_missing_pretrained_checkpoint(tmp_path):
    backbone = StubBackbone(tmp_path, tensors(a=[1.0]), {"t1": tensors(a=[2.0])})
    (tmp_path / "pre.safetensors").unlink()
    with pytest.raises(CheckpointError, match="checkpoint not found: .*pre.safetensors"):
        ModelPool(backbone)


def test_unprepared_backbone_names_the_prepare_command(tmp_path):
    # the real backbone, pointed at an empty cache: its own error says how to fix it
    backbone = TinyBert(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="mergebench prepare --backbone tiny-bert"):
        ModelPool(backbone)
