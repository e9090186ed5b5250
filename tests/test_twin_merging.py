"""Twin-Merging on a tiny two-Linear encoder: SVD experts, hook-based per-sample
composition against materialised weights, the router, and storage."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
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
    shared, artifacts = make_method("twin-merging", {"rank": 4, "rank_rule": "fixed"}).build(pool)
    for task in pool.tasks:
        factors = decode_experts(artifacts[experts_artifact(task)], task)
        assert sorted(factors) == LINEAR  # biases are not fine-tuned here: no expert
        for key in LINEAR:
            u, s, v = factors[key]
            expected = pool.finetuned(task, key) - shared[key]
            assert torch.allclose(u @ torch.diag(s) @ v.T, expected, atol=1e-5)


def test_one_hot_full_rank_equals_the_finetuned_model(pool):
    # biases are not fine-tuned in this pool, so theta_s + expert_k is exactly theta_k
    shared, artifacts = make_method("twin-merging", {"rank": 4, "rank_rule": "fixed"}).build(pool)
    merged = TwinMerged(pool, shared, artifacts)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    for k, task in enumerate(pool.tasks):
        finetuned = LinearEncoder()
        finetuned.load_state_dict(pool.finetuned_state(task))
        weights = torch.zeros(5, 2)
        weights[:, k] = 1.0
        assert torch.allclose(merged.features({"x": x}, weights), finetuned(x), atol=1e-5)
        assert torch.allclose(merged.predict(task, {"x": x}), finetuned(x), atol=1e-5)  # no router: oracle


@pytest.mark.parametrize("scope", ["linear", "all-2d"])
@pytest.mark.parametrize("shape", [(2, 4), (2, 3, 4)])
def test_hooks_equal_per_sample_materialised_weights(tmp_path, shape, scope):
    pretrained, finetuned = states(bias_changes=True)
    with ModelPool(LinearBackbone(tmp_path, pretrained, finetuned)) as pool:
        method = make_method("twin-merging", {"rank": 2, "rank_rule": "fixed", "scope": scope})
        shared, artifacts = method.build(pool)  # truncated experts
        merged = TwinMerged(pool, shared, artifacts)
        weights = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        out = merged.features({"x": x}, weights)
        decoded = [decode_tensors(artifacts[experts_artifact(t)]) for t in pool.tasks]
        biases = ["net.0.bias", "net.2.bias"] if scope == "all-2d" else []
        assert sorted(decoded[0]) == sorted([f"{k}.{p}" for k in LINEAR for p in "USV"] + [f"{k}.D" for k in biases])
        for b in range(2):
            params = dict(shared)
            for key in LINEAR:
                params[key] = shared[key] + sum(
                    weights[b, k] * d[f"{key}.U"] @ torch.diag(d[f"{key}.S"]) @ d[f"{key}.V"].T
                    for k, d in enumerate(decoded)
                )
            for key in biases:  # dense experts: exactly theta_k - theta_s
                params[key] = shared[key] + sum(weights[b, k] * (pool.finetuned(t, key) - shared[key])
                                                for k, t in enumerate(pool.tasks))
            reference = functional_call(LinearEncoder(), params, (x[b : b + 1],))  # fresh, hook-free
            assert torch.allclose(out[b : b + 1], reference, atol=1e-5)
        assert merged._weights is None  # hooks are inactive outside a composed forward



def test_router_separates_two_clusters(pool):
    exemplars = clusters()
    merged = make_method("twin-merging", {"exemplars": 20, "router_epochs": 200, "router_lr": 1e-2}).merge(pool, exemplars)
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
    a = make_method("twin-merging", {"router_epochs": 20}, seed=5).merge(pool, exemplars)
    b = make_method("twin-merging", {"router_epochs": 20}, seed=5).merge(pool, exemplars)
    assert a.artifacts()["router.mbc"] == b.artifacts()["router.mbc"]


def test_shared_router_features_route_too(pool):
    merged = make_method("twin-merging", {"router_epochs": 200, "router_lr": 1e-2, "router_features": "shared"}).merge(
        pool, clusters())
    assert merged.feature_encoder is None
    weights = merged.routing_weights("t1", {"x": torch.tensor([[-2.0] * 4, [2.0] * 4])})
    assert weights.argmax(1).tolist() == [0, 1]


def test_storage_is_the_artifacts_bytes(pool):
    merged = make_method("twin-merging", {"rank": 2, "rank_rule": "fixed", "router_epochs": 5}).merge(pool, clusters())
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
    merged = make_method("twin-merging", {"rank": 2, "rank_rule": "fixed", "router_epochs": 5}).merge(pool, clusters())
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
    _, rank_one = make_method("twin-merging", {"rank": 1, "rank_rule": "fixed"}).build(pool)
    with pytest.raises(CorruptArtifactError, match=r"t2\.experts\.mbc: tensor 'net\.0\.weight\.U': U, S, V of shapes "
                                                   r"\[\[4, 1\], \[1\], \[4, 1\]\], t1\.experts\.mbc has \[\[4, 2\]"):
        TwinMerged(pool, shared, {**artifacts, "t2.experts.mbc": rank_one["t2.experts.mbc"]})
    with pytest.raises(CorruptArtifactError, match=r"missing Twin-Merging artifact t1\.experts\.mbc"):
        TwinMerged(pool, shared, {k: v for k, v in artifacts.items() if k != "t1.experts.mbc"})


# --------------------------------------------------------------------------- rank rule, scope, schedule


class MixedEncoder(nn.Module):
    """Token ids -> Embedding (12x20) plus position Embedding (5x20) read with (1, N) ids as BERT
    does -> Linear 20->30 -> LayerNorm -> tanh -> Linear 30->20, times a bare (4, 5) gate (no
    hook composes it: materialised per sample), mean over tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 20)
        self.pos = nn.Embedding(5, 20)
        self.up = nn.Linear(20, 30)
        self.norm = nn.LayerNorm(30)
        self.down = nn.Linear(30, 20)
        self.gate = nn.Parameter(torch.ones(4, 5))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device)[None])
        h = self.down(torch.tanh(self.norm(self.up(h))))
        return (h * self.gate.reshape(-1)).mean(1)


class MixedBackbone(StubBackbone):
    def __init__(self, root, pretrained, finetuned):
        super().__init__(root, pretrained, finetuned, FourFeatureData())

    def build_encoder(self):
        return MixedEncoder()


@pytest.fixture
def mixed_pool(tmp_path):
    generator = torch.Generator().manual_seed(4)
    base = {k: v for k, v in MixedEncoder().state_dict().items() if v.is_floating_point()}
    pretrained = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    finetuned = {task: {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()}
                 for task in ("t1", "t2", "t3")}
    with ModelPool(MixedBackbone(tmp_path, pretrained, finetuned)) as pool:
        yield pool


def entry_shapes(artifacts, task="t1"):
    return {key: tuple(value.shape) for key, value in decode_tensors(artifacts[experts_artifact(task)]).items()}


@pytest.mark.parametrize("hparams, ranks", [
    ({}, {"emb.weight": 1, "up.weight": 2, "down.weight": 2}),  # int(0.1 x min): 12 -> 1, 20 -> 2; 5, 4 -> 0
    ({"rank_ratio": 0.5}, {"emb.weight": 6, "pos.weight": 2, "up.weight": 10, "down.weight": 10, "gate": 2}),
    ({"rank_rule": "fixed", "rank": 3}, {"emb.weight": 3, "pos.weight": 3, "up.weight": 3, "down.weight": 3,
                                         "gate": 3}),
    ({"rank_rule": "fixed", "rank": 16}, {"emb.weight": 12, "pos.weight": 5, "up.weight": 16, "down.weight": 16,
                                          "gate": 4}),
])
def test_rank_rule_sets_the_stored_factor_shapes(mixed_pool, hparams, ranks):
    _, artifacts = make_method("twin-merging", hparams).build(mixed_pool)
    shapes = entry_shapes(artifacts)
    rows_cols = {"emb.weight": (12, 20), "pos.weight": (5, 20), "up.weight": (30, 20), "down.weight": (20, 30),
                 "gate": (4, 5)}
    for key, (rows, cols) in rows_cols.items():
        if key not in ranks:
            assert not any(entry.startswith(key + ".") for entry in shapes)  # rank 0: no expert
            continue
        r = ranks[key]
        assert (shapes[f"{key}.U"], shapes[f"{key}.S"], shapes[f"{key}.V"]) == ((rows, r), (r,), (cols, r))
    # all-2d: the 1-D tensors (biases, LayerNorm) are dense experts
    for key, size in {"up.bias": 30, "norm.weight": 30, "norm.bias": 30, "down.bias": 20}.items():
        assert shapes[f"{key}.D"] == (size,)


def test_scope_linear_keeps_only_linear_weights(mixed_pool):
    _, artifacts = make_method("twin-merging", {"scope": "linear", "rank_rule": "fixed", "rank": 2}).build(mixed_pool)
    assert sorted(entry_shapes(artifacts)) == sorted(f"{k}.{p}" for k in ("down.weight", "up.weight") for p in "USV")


def test_defaults_are_the_authors_rank_rule_and_scope():
    d = TwinMerging.defaults()
    assert (d["rank_rule"], d["rank_ratio"], d["scope"], d["rank"]) == ("ratio", 0.1, "all-2d", 16)
    assert (d["router_epochs"], d["router_lr"], d["router_batch_size"], d["router_lr_decay"]) == (10, 1e-3, 1024, True)
    assert "router_steps" not in d


def test_all_2d_composition_equals_materialised_weights(mixed_pool):
    """Embedding, Linear (weight and bias) and LayerNorm hooks plus the per-sample gate, against
    theta_s + sum_k w_k E_k materialised from the stored entries for each sample."""
    shared, artifacts = make_method("twin-merging", {"rank_ratio": 0.5}).build(mixed_pool)
    merged = TwinMerged(mixed_pool, shared, artifacts)
    assert merged.materialised_keys == ["gate"]
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    x = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(5))
    out = merged.features({"x": x}, weights)
    decoded = [decode_tensors(artifacts[experts_artifact(t)]) for t in mixed_pool.tasks]
    keys = {entry.rsplit(".", 1)[0] for entry in decoded[0]}
    for b in range(3):
        params = dict(shared)
        for key in keys:
            for k, d in enumerate(decoded):
                if f"{key}.D" in d:
                    expert = d[f"{key}.D"]
                else:
                    expert = d[f"{key}.U"] @ torch.diag(d[f"{key}.S"]) @ d[f"{key}.V"].T
                params[key] = params[key] + weights[b, k] * expert.reshape(shared[key].shape)
        reference = functional_call(MixedEncoder(), params, (x[b : b + 1],))
        assert torch.allclose(out[b : b + 1], reference, atol=1e-5)


def test_full_rank_one_hot_is_the_finetuned_model(mixed_pool):
    shared, artifacts = make_method("twin-merging", {"rank_ratio": 1.0}).build(mixed_pool)
    merged = TwinMerged(mixed_pool, shared, artifacts)
    x = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(6))
    for k, task in enumerate(mixed_pool.tasks):
        finetuned = MixedEncoder()
        finetuned.load_state_dict(mixed_pool.finetuned_state(task))
        weights = torch.zeros(2, 3)
        weights[:, k] = 1.0
        assert torch.allclose(merged.features({"x": x}, weights), finetuned(x), atol=1e-4)


@pytest.mark.parametrize("n, batch, epochs, per_epoch", [(20, 16, 3, 3), (20, 1024, 4, 1), (20, 13, 2, 3)])
def test_router_schedule_steps_and_linear_decay(pool, monkeypatch, n, batch, epochs, per_epoch):
    """epochs x ceil(N K / batch) Adam steps (2 x 20 = 40 features; with batch 13 the last
    batch of one is dropped), the learning rate decaying linearly to 0 (HF Trainer)."""
    rates = []
    step = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    lr = 1e-3
    make_method("twin-merging", {"exemplars": n, "router_epochs": epochs, "router_batch_size": batch,
                                 "router_lr": lr}).merge(pool, clusters(n))
    total = epochs * per_epoch
    assert len(rates) == total
    assert rates == pytest.approx([lr * (total - i) / total for i in range(total)])


def test_router_lr_decay_off_keeps_the_rate(pool, monkeypatch):
    rates = []
    step = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    make_method("twin-merging", {"router_epochs": 3, "router_batch_size": 16, "router_lr_decay": False}).merge(
        pool, clusters(20))
    assert rates == [1e-3] * 9


class ConvEncoder(nn.Module):
    """(B, 2, 6) -> Conv1d(2 -> 3, kernel 3) -> tanh -> flatten (B, 12) times a bare (12,) scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.scale = nn.Parameter(torch.ones(12))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).flatten(1) * self.scale


class ConvBackbone(StubBackbone):
    def __init__(self, root, pretrained, finetuned):
        super().__init__(root, pretrained, finetuned, FourFeatureData())

    def build_encoder(self):
        return ConvEncoder()


def test_convolution_hook_and_bare_parameter_equal_materialised_weights(tmp_path):
    generator = torch.Generator().manual_seed(7)
    base = {k: v for k, v in ConvEncoder().state_dict().items() if v.is_floating_point()}
    pretrained = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    finetuned = {t: {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()}
                 for t in ("t1", "t2")}
    with ModelPool(ConvBackbone(tmp_path, pretrained, finetuned)) as pool:
        shared, artifacts = make_method("twin-merging", {"rank_rule": "fixed", "rank": 2}).build(pool)
        merged = TwinMerged(pool, shared, artifacts)
        assert merged.materialised_keys == ["scale"]  # the conv weight (3 x 2 x 3 as 3 x 6) and bias are hooked
        weights = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
        x = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(8))
        out = merged.features({"x": x}, weights)
        decoded = [decode_tensors(artifacts[experts_artifact(t)]) for t in pool.tasks]
        assert tuple(decoded[0]["conv.weight.U"].shape) == (3, 2) and tuple(decoded[0]["conv.weight.V"].shape) == (6, 2)
        for b in range(2):
            params = dict(shared)
            for k, d in enumerate(decoded):
                conv = d["conv.weight.U"] @ torch.diag(d["conv.weight.S"]) @ d["conv.weight.V"].T
                params["conv.weight"] = params["conv.weight"] + weights[b, k] * conv.reshape(3, 2, 3)
                params["conv.bias"] = params["conv.bias"] + weights[b, k] * d["conv.bias.D"]
                params["scale"] = params["scale"] + weights[b, k] * d["scale.D"]
            reference = functional_call(ConvEncoder(), params, (x[b : b + 1],))
            assert torch.allclose(out[b : b + 1], reference, atol=1e-5)


class DirectReadEncoder(nn.Module):
    """A parent reads ``inner``'s parameters itself (as nn.MultiheadAttention does with its
    out_proj): inner's forward, and so its hook, never runs."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.outer = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(F.linear(x, self.inner.weight, self.inner.bias)))


class DirectReadBackbone(StubBackbone):
    def __init__(self, root, pretrained, finetuned):
        super().__init__(root, pretrained, finetuned, FourFeatureData())

    def build_encoder(self):
        return DirectReadEncoder()


def test_experts_of_a_module_whose_hook_never_runs_are_materialised(tmp_path):
    generator = torch.Generator().manual_seed(9)
    base = {k: v for k, v in DirectReadEncoder().state_dict().items() if v.is_floating_point()}
    pretrained = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    finetuned = {t: {k: v + torch.randn(v.shape, generator=generator) for k, v in pretrained.items()}
                 for t in ("t1", "t2")}
    with ModelPool(DirectReadBackbone(tmp_path, pretrained, finetuned)) as pool:
        shared, artifacts = make_method("twin-merging", {"rank_rule": "fixed", "rank": 4}).build(pool)
        merged = TwinMerged(pool, shared, artifacts)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10))
        for k, task in enumerate(pool.tasks):  # full rank, one-hot: the fine-tuned model, from the first batch on
            finetuned_encoder = DirectReadEncoder()
            finetuned_encoder.load_state_dict(pool.finetuned_state(task))
            weights = torch.zeros(3, 2)
            weights[:, k] = 1.0
            assert torch.allclose(merged.features({"x": x}, weights), finetuned_encoder(x), atol=1e-5)
        assert merged.materialised_keys == ["inner.bias", "inner.weight"]
