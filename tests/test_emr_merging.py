"""EMR-Merging against the paper's equations on a hand-computed 2-task, 3-tensor case,
its storage (bit-packed masks, fp32 unified vector, fp32 rescalers) and its checks."""
import numpy as np
import pytest
import torch

from mergebench.codecs import CorruptArtifactError
from mergebench.container import decode_tensors, encode_tensors
from mergebench.method import HyperparameterError
from mergebench.methods.emr_merging import (
    UNIFIED,
    EMRStore,
    elect,
    emr_merge,
    masks_artifact,
)
from mergebench.runner import make_method
from tests._stub import finetuned_from, make_pool, tensors

PRE = tensors(a=[1.0, 1.0, 1.0, 1.0], b=[0.0, 0.0], c=[2.0])
TAU1 = tensors(a=[3.0, -1.0, 2.0, 0.5], b=[1.0, -2.0], c=[0.5])
TAU2 = tensors(a=[1.0, 2.0, -2.0, -1.0], b=[-3.0, 0.5], c=[0.25])

# By hand. a: sums [4, 1, 0, -0.5] -> gamma [+, +, 0, -]; entry 2 cancels exactly (2 - 2):
#   no task agrees with sign 0, so tau_uni = 0 there; eps = [max(3, 1), 2 (tau2 only), 0, 1 (tau2 only)].
# b: sums [-2, -1.5] -> gamma [-, -]; eps = [3 (tau2 only), 2 (tau1 only)].
# c: sum 0.75 -> +; eps = max(0.5, 0.25).
UNI = tensors(a=[3.0, 2.0, 0.0, -1.0], b=[-3.0, -2.0], c=[0.5])
MASK1 = {"a": [1, 0, 0, 0], "b": [0, 1], "c": [1]}
MASK2 = {"a": [1, 1, 0, 1], "b": [1, 0], "c": [1]}
# lambda over all three tensors: sum|tau_k| / sum|M_k (.) tau_uni|
LAMBDA1 = (6.5 + 3.0 + 0.5) / (3.0 + 2.0 + 0.5)  # = 10 / 5.5
LAMBDA2 = (6.0 + 3.5 + 0.25) / (3.0 + 2.0 + 1.0 + 3.0 + 0.5)  # = 9.75 / 9.5


def as_mask(values):
    return torch.tensor(values, dtype=torch.bool)


@pytest.fixture
def pool(tmp_path):
    with make_pool(tmp_path, PRE, finetuned_from(PRE, TAU1, TAU2)) as pool:
        yield pool


def test_election_of_sign_and_magnitude_with_disagreeing_and_cancelling_entries():
    for key in PRE:
        tau_uni, masks = elect(torch.stack([TAU1[key], TAU2[key]]))
        assert torch.equal(tau_uni, UNI[key]), key
        assert masks.tolist() == [[bool(v) for v in MASK1[key]], [bool(v) for v in MASK2[key]]], key


def test_masks_are_tau_k_times_tau_uni_positive():
    taus = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tau_uni, masks = elect(taus)
    assert torch.equal(masks, taus * tau_uni > 0)
    # the unified magnitude is the largest agreeing magnitude, never larger than any max |tau_k|
    assert torch.all(tau_uni.abs() <= taus.abs().amax(0))


def test_store_decodes_unified_vector_masks_and_rescalers_over_all_tensors(pool):
    store = EMRStore(pool.tasks, emr_merge(pool))
    assert store.keys() == ["a", "b", "c"]
    for key in PRE:
        assert torch.equal(store.unified[key], UNI[key])
        assert torch.equal(store.mask(0, key), as_mask(MASK1[key]))
        assert torch.equal(store.mask(1, key), as_mask(MASK2[key]))
    assert torch.allclose(store.lambdas, torch.tensor([LAMBDA1, LAMBDA2]))
    # one scalar per task over the whole model: not the per-tensor ratios, not the authors' sum of means
    per_tensor_means = (6.5 / 4 + 3.0 / 2 + 0.5) / (3.0 / 4 + 2.0 / 2 + 0.5)
    assert not np.isclose(float(store.lambdas[0]), per_tensor_means)


def test_predict_for_each_task_is_theta_pre_plus_lambda_mask_tau_uni(pool):
    merged = make_method("emr-merging").merge(pool)
    lambdas, masks = (LAMBDA1, LAMBDA2), (MASK1, MASK2)
    x = {"x": torch.ones(1)}
    for k, task in enumerate(pool.tasks):
        weights = torch.zeros(2)
        weights[k] = 1.0
        params = merged.merged_parameters(weights)
        expected = {key: PRE[key] + lambdas[k] * as_mask(masks[k][key]) * UNI[key] for key in PRE}
        assert set(params) == set(expected)
        for key in PRE:
            assert torch.allclose(params[key], expected[key]), (task, key)
        # the stub encoder sums its parameters; the integer buffer is not a parameter
        total = sum(v.sum() for v in expected.values())
        assert torch.allclose(merged.predict(task, x), total.reshape(1))


def test_method_flags_and_no_hyperparameters():
    method = make_method("emr-merging")
    assert method.name == "emr-merging" and method.hparams == {}
    assert method.dynamic and method.uses_task_identity and not method.automatic
    assert not method.needs_exemplars
    with pytest.raises(HyperparameterError, match=r"no hyperparameter scaling; valid: \(none\)"):
        make_method("emr-merging", {"scaling": 0.3})


def test_zero_denominator_gives_a_finite_rescaler_and_the_pretrained_weights(tmp_path):
    pre = tensors(a=[0.0, 0.0], b=[1.0])
    t1 = tensors(a=[3.0, 1.0], b=[0.0])
    t2 = tensors(a=[-1.0, 0.0], b=[0.0])  # disagrees with the elected sign everywhere
    t3 = tensors(a=[0.0, 0.0], b=[0.0])  # identical to the pretrained model
    with make_pool(tmp_path, pre, finetuned_from(pre, t1, t2, t3)) as pool:
        merged = make_method("emr-merging").merge(pool)
        store = merged.store
        assert store.keys() == ["a"]  # b: every task vector is zero, nothing stored
        assert torch.isfinite(store.lambdas).all()
        assert store.lambdas.tolist() == [1.0, 1.0, 1.0]  # t1: 4 / 4; t2, t3: 0 denominators
        for k in (1, 2):
            weights = torch.zeros(3)
            weights[k] = 1.0
            params = merged.merged_parameters(weights)
            assert list(params) == ["a"] and torch.equal(params["a"], pre["a"])
            assert torch.equal(merged.predict(pool.tasks[k], {"x": torch.ones(1)}), torch.tensor([1.0]))


def test_storage_is_the_artifacts_bytes_and_beats_k_fp32_task_vectors(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(100, 100, generator=g)}
    taus = [{"w": torch.randn(100, 100, generator=g) * 0.01} for _ in range(2)]
    with make_pool(tmp_path, pre, finetuned_from(pre, *taus)) as pool:
        merged = make_method("emr-merging").merge(pool)
        artifacts = merged.artifacts()
        assert set(artifacts) == {UNIFIED, "t1.masks.mbc", "t2.masks.mbc"}
        assert merged.storage_bytes() == sum(len(a) for a in artifacts.values())
        assert merged.storage_bytes() < 2 * 10_000 * 4  # K fp32 task vectors
        # fp32 tau_uni (40 kB) + 1 bit per entry per mask (1250 B) + small headers
        assert 40_000 < len(artifacts[UNIFIED]) < 40_000 + 512
        for task in pool.tasks:
            assert 1250 < len(artifacts[masks_artifact(task)]) < 1250 + 512
        # inference runs from the decoded artifacts and matches the definition
        tau = torch.stack([t["w"] for t in taus])
        tau_uni, masks = elect(tau)
        lam = tau.abs().sum((1, 2)) / (tau_uni.abs() * masks).sum((1, 2))
        for k in range(2):
            weights = torch.zeros(2)
            weights[k] = 1.0
            expected = pre["w"] + lam[k] * masks[k] * tau_uni
            assert torch.allclose(merged.merged_parameters(weights)["w"], expected, atol=1e-6)


@pytest.mark.parametrize("name", [UNIFIED, "t2.masks.mbc"])
@pytest.mark.parametrize("where", ["last byte", "header byte", "truncated"])
def test_a_corrupt_artifact_raises_an_error_naming_it(pool, name, where):
    artifacts = emr_merge(pool)
    damaged = bytearray(artifacts[name])
    if where == "last byte":
        damaged[-1] ^= 0x01
    elif where == "header byte":
        damaged[20] ^= 0x01
    else:
        damaged = damaged[: len(damaged) - 3]
    artifacts[name] = bytes(damaged)
    with pytest.raises(CorruptArtifactError, match=name.replace(".", r"\.")):
        EMRStore(pool.tasks, artifacts)


def test_swapped_or_missing_artifacts_are_named(pool):
    artifacts = emr_merge(pool)
    swapped = dict(artifacts)
    swapped["t1.masks.mbc"], swapped["t2.masks.mbc"] = artifacts["t2.masks.mbc"], artifacts["t1.masks.mbc"]
    with pytest.raises(CorruptArtifactError, match=r"t1\.masks\.mbc.*task 't2'"):
        EMRStore(pool.tasks, swapped)
    missing = {k: v for k, v in artifacts.items() if k != "t2.masks.mbc"}
    with pytest.raises(CorruptArtifactError, match=r"t2\.masks\.mbc"):
        EMRStore(pool.tasks, missing)


def test_combine_with_mixed_weights_sums_the_rescaled_masked_vectors(pool):
    store = EMRStore(pool.tasks, emr_merge(pool))
    w = torch.tensor([0.25, 0.75])
    for key in PRE:
        expected = (0.25 * LAMBDA1 * as_mask(MASK1[key]) + 0.75 * LAMBDA2 * as_mask(MASK2[key])) * UNI[key]
        assert torch.allclose(store.combine(key, w), expected)


def test_every_single_bit_flip_of_an_artifact_is_detected(pool):
    artifacts = emr_merge(pool)
    for name, bits in ((masks_artifact("t2"), range(8)), (UNIFIED, (0, 5))):
        data = artifacts[name]
        for position in range(len(data)):
            for bit in bits:
                damaged = bytearray(data)
                damaged[position] ^= 1 << bit
                with pytest.raises(CorruptArtifactError, match=name.replace(".", r"\.")):
                    EMRStore(pool.tasks, {**artifacts, name: bytes(damaged)})


def test_artifacts_are_checksummed_containers_with_one_bit_masks_and_the_rescaler_in_metadata(pool):
    artifacts = emr_merge(pool)
    masks = decode_tensors(artifacts[masks_artifact("t2")], source="t2")
    assert masks.metadata == {"content": "emr-merging/masks", "task": "t2", "lambda": pytest.approx(LAMBDA2)}
    for key in PRE:
        assert torch.equal(masks.dense(key, torch.bool), as_mask(MASK2[key]))
    unified = decode_tensors(artifacts[UNIFIED])
    assert unified.metadata["tasks"] == ["t1", "t2"]
    assert all(torch.equal(unified.dense(key, torch.float32), UNI[key]) for key in PRE)
    # a well-formed container of the wrong content, or with a mask of the wrong shape, is refused by name
    with pytest.raises(CorruptArtifactError, match=r"t1\.masks\.mbc: holds 'emr-merging/unified'"):
        EMRStore(pool.tasks, {**artifacts, masks_artifact("t1"): artifacts[UNIFIED]})
    reshaped = encode_tensors({**{k: masks[k] for k in PRE}, "a": torch.ones(5, dtype=torch.bool)}, masks.metadata)
    with pytest.raises(CorruptArtifactError, match=r"t2\.masks\.mbc: tensor 'a': has shape \[5\], expected \[4\]"):
        EMRStore(pool.tasks, {**artifacts, masks_artifact("t2"): reshaped})
