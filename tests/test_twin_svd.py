"""Twin-Merging's randomized SVD against the exact one: the rank-r error bound (Eckart-Young
optimum from numpy's SVD), seeding, and experts / merged features close to the exact path's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergebench.container import decode_tensors
from mergebench.methods.twin_merging import TwinMerged, TwinMerging, experts_artifact, svd_factors, svd_seed
from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests._stub import StubBackbone, StubData


def matrix(rows: int, cols: int, kind: str, seed: int) -> np.ndarray:
    """A test matrix: singular values i^-1 or i^-0.5 on random orthonormal bases, or i.i.d.
    Gaussian entries (a Marchenko-Pastur spectrum with small gaps: the hard case)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((rows, cols))
    n = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, n)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, n)))
    decay = {"power-1": 1.0, "power-0.5": 0.5}[kind]
    return (u * np.arange(1, n + 1) ** -decay) @ v.T


@pytest.mark.parametrize("kind", ["power-1", "power-0.5", "gaussian"])
@pytest.mark.parametrize("rows, cols", [(300, 120), (120, 300), (200, 200)])
def test_randomized_rank_r_error_is_within_1_01_of_the_optimum(rows, cols, kind):
    a = matrix(rows, cols, kind, seed=rows + cols)
    r = int(0.1 * min(rows, cols))  # the default rank rule
    u, s, v = svd_factors(torch.from_numpy(a).float(), r, "randomized", seed=5)
    assert (u.shape, s.shape, v.shape) == ((rows, r), (r,), (cols, r)) and u.dtype == torch.float32
    exact = np.linalg.svd(a, compute_uv=False)
    optimum = np.sqrt(np.sum(exact[r:] ** 2))  # Eckart-Young: the best rank-r Frobenius error
    error = np.linalg.norm(a - (u.double().numpy() * s.double().numpy()) @ v.double().numpy().T)
    assert optimum <= error * (1 + 1e-6)  # no rank-r matrix beats the optimum: the check can fail both ways
    assert error <= 1.01 * optimum
    assert np.allclose(s.numpy(), exact[:r], rtol=0.02)
    # orthonormal factors
    assert torch.allclose(u.T @ u, torch.eye(r), atol=1e-4) and torch.allclose(v.T @ v, torch.eye(r), atol=1e-4)


def test_randomized_is_seeded_and_far_from_a_plain_sketch():
    a = torch.from_numpy(matrix(150, 100, "gaussian", seed=1)).float()
    first, again, other = (svd_factors(a, 10, "randomized", seed=s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])
    # the seed is fixed by (run seed, tensor, task) alone
    assert svd_seed(0, "a.weight", 1) == svd_seed(0, "a.weight", 1)
    assert len({svd_seed(0, "a.weight", 1), svd_seed(1, "a.weight", 1), svd_seed(0, "b.weight", 1),
                svd_seed(0, "a.weight", 0)}) == 4


@pytest.mark.parametrize("rows, cols, rank, sketched", [
    (30, 12, 3, False), (200, 120, 60, False), (200, 123, 21, False), (123, 200, 21, False),  # 4 (r + 10) > min
    (200, 124, 21, True), (124, 200, 21, True),  # 4 (r + 10) = min: the sketch runs
])
def test_a_sketch_over_a_quarter_of_the_smaller_side_is_the_exact_svd(rows, cols, rank, sketched):
    a = torch.from_numpy(matrix(rows, cols, "gaussian", seed=2)).float()
    randomized, exact = svd_factors(a, rank, "randomized", seed=0), svd_factors(a, rank, "exact")
    assert all(torch.equal(x, y) for x, y in zip(randomized, exact)) is not sketched


class WideEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 160), nn.Tanh(), nn.Linear(160, 64))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))  # the stub's integer buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WideBackbone(StubBackbone):
    def build_encoder(self):
        return WideEncoder()


@pytest.fixture
def wide_pool(tmp_path):
    """Three tasks whose weight deltas have spectra i^-1 (biases change too: dense experts)."""
    generator = torch.Generator().manual_seed(0)
    pretrained = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in WideEncoder().state_dict().items()
                  if v.is_floating_point()}
    finetuned = {}
    for t, task in enumerate(("t1", "t2", "t3")):
        finetuned[task] = {k: v + (torch.from_numpy(matrix(*v.shape, "power-1", seed=10 * t + i)).float()
                                   if v.dim() == 2 else 0.01 * torch.randn(v.shape, generator=generator))
                           for i, (k, v) in enumerate(pretrained.items())}
    with ModelPool(WideBackbone(tmp_path, pretrained, finetuned, StubData())) as pool:
        yield pool


def products(artifacts, task):
    """{key: U diag(S) V^T} (or the dense expert) from the stored entries, by hand."""
    stored = decode_tensors(artifacts[experts_artifact(task)])
    keys = {name.rsplit(".", 1)[0] for name in stored}
    return {key: stored[f"{key}.D"] if f"{key}.D" in stored else
            stored[f"{key}.U"] @ torch.diag(stored[f"{key}.S"]) @ stored[f"{key}.V"].T for key in keys}


def test_randomized_experts_and_merged_features_are_close_to_the_exact_path(wide_pool):
    assert TwinMerging.defaults()["svd"] == "randomized"
    shared_r, fast = make_method("twin-merging").build(wide_pool)
    shared_e, exact = make_method("twin-merging", {"svd": "exact"}).build(wide_pool)
    assert all(torch.equal(shared_r[k], shared_e[k]) for k in shared_r)  # the shared expert does not change
    for task in wide_pool.tasks:
        fast_e, exact_e = products(fast, task), products(exact, task)
        assert sorted(fast_e) == sorted(exact_e) == sorted(wide_pool.merged_keys)
        for key, value in exact_e.items():
            assert (fast_e[key] - value).norm() <= 1e-3 * value.norm(), key
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    weights = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(4)), -1)
    out_fast = TwinMerged(wide_pool, shared_r, fast).features({"x": x}, weights)
    out_exact = TwinMerged(wide_pool, shared_e, exact).features({"x": x}, weights)
    assert torch.allclose(out_fast, out_exact, atol=1e-4, rtol=1e-4)
    assert not torch.equal(out_fast, out_exact)  # the randomized path ran


def test_rank_ratio_0_5_takes_the_exact_path_bit_for_bit(wide_pool):
    """At the t-switch-cvpr2025 protocol's rank ratio every sketch would exceed a quarter of
    the smaller side: the stored experts are the exact path's, byte for byte."""
    _, fast = make_method("twin-merging", {"rank_ratio": 0.5}).build(wide_pool)
    _, exact = make_method("twin-merging", {"rank_ratio": 0.5, "svd": "exact"}).build(wide_pool)
    assert all(fast[experts_artifact(task)] == exact[experts_artifact(task)] for task in wide_pool.tasks)
