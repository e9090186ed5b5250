"""Twin-Merging on a tiny two-Linear encoder: SVD experts, hook-based per-sample
composition against materialised weights, the router, and storage."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.func import functional_call

from mergebench.container import decode_tensors
from mergebench.errors import CorruptArtifactError
from mergebench.methods.twin_merging import (TwinMerged, TwinMerging, decode_experts, decode_router, experts_artifact,
                                             svd_factors)
from mergebench.pool import ModelPool
from mergebench.registry import METHODS
from mergebench.runner import make_method
from tests._stub import StubBackbone, StubData

LINEAR = ["net.0.weight", "net.2.weight"]


class LinearEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))  # the stub's integer buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FourFeatureData(StubData):
    def batches(self, task, split, batch_size):
        yield {"x": torch.ones(2, 4)}, torch.zeros(2, dtype=torch.long)

    def exemplars(self, task, n, seed, split="train"):
        return {"x": torch.ones(n, 4)}


class LinearBackbone(StubBackbone):
    """The stub backbone with a two-Linear encoder taking 4-feature inputs."""

    def __init__(self, root, pretrained, finetuned):
        super().__init__(root, pretrained, finetuned, FourFeatureData())

    def build_encoder(self):
        return LinearEncoder()


def states(bias_changes: bool = True):
    generator = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in LinearEncoder().state_dict().items() if v.is_floating_point()}
    pretrained = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    finetuned = {}
    for task in ("t1", "t2"):
        finetuned[task] = {
            k: v + (torch.randn(v.shape, generator=generator) if bias_changes or k in LINEAR else 0.0)
            for k, v in pretrained.items()
        }
    return pretrained, finetuned


@pytest.fixture
def pool(tmp_path):
    pretrained, finetuned = states(bias_changes=False)
    with ModelPool(LinearBackbone(tmp_path, pretrained, finetuned)) as pool:
        yield pool


def clusters(n: int = 20):
    generator = torch.Generator().manual_seed(1)
    return {
        "t1": {"x": torch.full((n, 4), -2.0) + 0.3 * torch.randn(n, 4, generator=generator)},
        "t2": {"x": torch.full((n, 4), 2.0) + 0.3 * torch.randn(n, 4, generator=generator)},
    }


def test_registration_flags():
    cls = METHODS.get("twin-merging")
    assert cls is TwinMerging
    assert cls.needs_exemplars and cls.dynamic and not cls.uses_task_identity
    assert cls.defaults()["shared"] == "task-arithmetic" and cls.defaults()["exemplars"] == 100


def test_svd_factors_truncate_to_rank():
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    u, s, v = svd_factors(delta, 2)
    assert s.tolist() == [3.0, 2.0] and u.shape == (3, 2) and v.shape == (3, 2)
    assert torch.allclose(u @ torch.diag(s) @ v.T, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)


def test_shared_expert_is_task_arithmetic_with_lambda_0_3(pool):
    shared, _ = make_method("twin-merging").build(pool)
    for key in pool.merged_keys:
        expected = pool.pretrained(key) + 0.3 * sum(pool.task_vectors(key))
        assert torch.allclose(shared[key], expected, atol=1e-6)


def test_full_rank_experts_reconstruct_finetuned_minus_shared(pool):
    shared, artifacts = make_method("twin-merging", {"rank": 4}).build(pool)
    for task in pool.tasks:
        factors = decode_experts(artifacts[experts_artifact(task)], task)
        assert sorted(factors) == LINEAR  # biases: no expert
        for key in LINEAR:
            u, s, v = factors[key]
            expected = pool.finetuned(task, key) - shared[key]
            assert torch.allclose(u @ torch.diag(s) @ v.T, expected, atol=1e-5)


def test_one_hot_full_rank_equals_the_finetuned_model(pool):
    # biases are not fine-tuned in this pool, so theta_s + expert_k is exactly theta_k
    shared, artifacts = make_method("twin-merging", {"rank": 4}).build(pool)
    merged = TwinMerged(pool, shared, artifacts)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    for k, task in enumerate(pool.tasks):
        finetuned = LinearEncoder()
        finetuned.load_state_dict(pool.finetuned_state(task))
        weights = torch.zeros(5, 2)
        weights[:, k] = 1.0
        assert torch.allclose(merged.features({"x": x}, weights), finetuned(x), atol=1e-5)
        assert torch.allclose(merged.predict(task, {"x": x}), finetuned(x), atol=1e-5)  # no router: oracle


@pytest.mark.parametrize("shape", [(2, 4), (2, 3, 4)])
def test_hooks_equal_per_sample_materialised_weights(tmp_path, shape):
    pretrained, finetuned = states(bias_changes=True)
    with ModelPool(LinearBackbone(tmp_path, pretrained, finetuned)) as pool:
        shared, artifacts = make_method("twin-merging", {"rank": 2}).build(pool)  # truncated experts
        merged = TwinMerged(pool, shared, artifacts)
        weights = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        out = merged.features({"x": x}, weights)
        decoded = [decode_tensors(artifacts[experts_artifact(t)]) for t in pool.tasks]
        for b in range(2):
            params = dict(shared)
            for key in LINEAR:
                params[key] = shared[key] + sum(
                    weights[b, k] * d[f"{key}.U"] @ torch.diag(d[f"{key}.S"]) @ d[f"{key}.V"].T
                    for k, d in enumerate(decoded)
                )
            reference = functional_call(LinearEncoder(), params, (x[b : b + 1],))  # fresh, hook-free
            assert torch.allclose(out[b : b + 1], reference, atol=1e-5)
        assert merged._weights is None  # hooks are inactive outside a composed forward



def test_router_separates_two_clusters(pool):
    exemplars = clusters()
    merged = make_method("twin-merging", {"exemplars": 20, "router_steps": 200, "router_lr": 1e-2}).merge(pool, exemplars)
    for k, task in enumerate(pool.tasks):
        probe = clusters(n=10)[task]  # points drawn around the same centres
        weights = merged.routing_weights(task, probe)
        assert torch.allclose(weights.sum(1), torch.ones(10))
        assert (weights.argmax(1) == k).all()
        fresh = {"x": torch.full((3, 4), 2.5 if k else -2.5)}  # unseen points of the cluster
        assert (merged.routing_weights(task, fresh)[:, k] > 0.9).all()
    merged.predict("t1", exemplars["t1"])
    assert merged.diagnostics()["routing_accuracy"] == {"t1": 1.0}


def test_router_training_is_seeded(pool):
    exemplars = clusters()
    a = make_method("twin-merging", {"router_steps": 20}, seed=5).merge(pool, exemplars)
    b = make_method("twin-merging", {"router_steps": 20}, seed=5).merge(pool, exemplars)
    assert a.artifacts()["router.mbc"] == b.artifacts()["router.mbc"]


def test_shared_router_features_route_too(pool):
    merged = make_method("twin-merging", {"router_steps": 200, "router_lr": 1e-2, "router_features": "shared"}).merge(
        pool, clusters())
    assert merged.feature_encoder is None
    weights = merged.routing_weights("t1", {"x": torch.tensor([[-2.0] * 4, [2.0] * 4])})
    assert weights.argmax(1).tolist() == [0, 1]


def test_storage_is_the_artifacts_bytes(pool):
    merged = make_method("twin-merging", {"rank": 2, "router_steps": 5}).merge(pool, clusters())
    artifacts = merged.artifacts()
    assert set(artifacts) == {"shared.mbc", "t1.experts.mbc", "t2.experts.mbc", "router.mbc"}
    assert merged.storage_bytes() == sum(len(a) for a in artifacts.values())
    shared = decode_tensors(artifacts["shared.mbc"])
    assert set(shared) == set(pool.keys())  # the full shared model
    factors = decode_tensors(artifacts["t1.experts.mbc"])
    assert factors["net.0.weight.U"].shape == (4, 2) and factors["net.2.weight.V"].shape == (4, 2)
    assert all(t.dtype == torch.float32 for t in factors.values())


def test_errors(pool):
    with pytest.raises(ValueError, match="exemplars"):
        make_method("twin-merging").merge(pool, None)
    with pytest.raises(ValueError, match="router_features"):
        make_method("twin-merging", {"router_features": "other"}).merge(pool, clusters())
    with pytest.raises(ValueError, match="static"):
        make_method("twin-merging", {"shared": "auto-switch"}).build(pool)
    with pytest.raises(ValueError, match="rank"):
        make_method("twin-merging", {"rank": 0}).build(pool)


def test_ties_shared_expert(pool):
    shared, _ = make_method("twin-merging", {"shared": "ties"}).build(pool)
    ties = make_method("ties").merge(pool)
    for key, value in ties.encoder.state_dict().items():
        assert torch.allclose(shared[key], value)


def test_router_and_experts_are_read_back_from_their_checked_containers(pool):
    merged = make_method("twin-merging", {"rank": 2, "router_steps": 5}).merge(pool, clusters())
    artifacts = merged.artifacts()
    router = decode_router(artifacts["router.mbc"], pool.tasks)
    assert not router.training and not merged.router.training
    stored = router.state_dict()
    assert all(torch.equal(value, stored[key]) for key, value in merged.router.state_dict().items())
    assert decode_tensors(artifacts["shared.mbc"]).metadata == {"content": "twin-merging/shared"}

    damaged = bytearray(artifacts["router.mbc"])
    damaged[-1] ^= 0x01  # the last payload: the last entry of the state dict
    with pytest.raises(CorruptArtifactError, match=r"router\.mbc: tensor 'net\.8\.bias': payload checksum mismatch"):
        decode_router(bytes(damaged), pool.tasks)
    with pytest.raises(CorruptArtifactError, match=r"router\.mbc: built for tasks \['t1', 't2'\]"):
        decode_router(artifacts["router.mbc"], ["t2", "t1"])
    with pytest.raises(CorruptArtifactError, match=r"router\.mbc: holds 'twin-merging/experts'"):
        decode_router(artifacts["t1.experts.mbc"], pool.tasks)

    shared = decode_tensors(artifacts["shared.mbc"])
    swapped = {**artifacts, "t2.experts.mbc": artifacts["t1.experts.mbc"]}
    with pytest.raises(CorruptArtifactError, match=r"t2\.experts\.mbc: holds the experts of task 't1'"):
        TwinMerged(pool, shared, swapped)
    _, rank_one = make_method("twin-merging", {"rank": 1}).build(pool)
    with pytest.raises(CorruptArtifactError, match=r"t2\.experts\.mbc: tensor 'net\.0\.weight\.U': U, S, V of shapes "
                                                   r"\[\[4, 1\], \[1\], \[4, 1\]\], t1\.experts\.mbc has \[\[4, 2\]"):
        TwinMerged(pool, shared, {**artifacts, "t2.experts.mbc": rank_one["t2.experts.mbc"]})
    with pytest.raises(CorruptArtifactError, match=r"missing Twin-Merging artifact t1\.experts\.mbc"):
        TwinMerged(pool, shared, {k: v for k, v in artifacts.items() if k != "t1.experts.mbc"})
