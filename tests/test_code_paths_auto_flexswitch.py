"""Auto-FlexSwitch's inference path (Auto-FlexSwitch §III-C5, Eqs. 5 and 17-19) against an
independent k-NN written in this file: what the router stores (the learned L, the projected
K-means centres and their tasks, C), that L is the Eq. 19 minimiser the record reports,
and that every input is composed as theta + sum_k w_k(x) tau~_k with w_k(x) the share of
its C nearest centres under d_L that belong to task k.

The toy encoder is one linear layer whose pretrained weights are the identity, so the
routing features are the inputs themselves: three tasks differ in one input dimension and
carry large noise in the three others, so plain Euclidean k-NN routes some inputs
differently from k-NN under the learned L, which is what makes "L is used" testable.
"""
from __future__ import annotations

import pytest
import torch

from mergebench.container import decode_tensors
from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests.test_code_paths_flexswitch import LinearFeatureEncoder, ToyBackbone, signed

DIM, TASKS, E, PER_CLUMP, C, RANK = 4, ("t1", "t2", "t3"), 3, 4, 3, 2
N = E * PER_CLUMP


def sample(generator, task_index: int, n: int) -> torch.Tensor:
    """Inputs of task k: dimension 0 near 3 (k - 1) (std 0.3), dimensions 1-3 noise of std 4."""
    x = 4.0 * torch.randn(n, DIM, generator=generator)
    x[:, 0] = 3.0 * (task_index - 1) + 0.3 * torch.randn(n, generator=generator)
    return x


def clumped(generator, task_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N exemplars of task k as E tight clumps (jitter 0.3) around points drawn like
    :func:`sample`, and the clumps' means: K-means with E centres finds exactly these."""
    means = sample(generator, task_index, E)
    points = means.repeat_interleave(PER_CLUMP, 0) + 0.3 * torch.randn(N, DIM, generator=generator)
    return points, points.view(E, PER_CLUMP, DIM).mean(1)


def knn_weights(features: torch.Tensor, centres: torch.Tensor, owners: torch.Tensor, neighbours: int) -> torch.Tensor:
    """w_k(x) = |N_x ∩ A_k| / C over the C nearest centres (Eq. 5 with Eq. 18's distance
    when ``features`` and ``centres`` are already projected)."""
    distances = ((features[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    nearest = distances.argsort(dim=1)[:, :neighbours]
    weights = torch.zeros(len(features), len(TASKS))
    for k in range(len(TASKS)):
        weights[:, k] = (owners[nearest] == k).sum(1).float() / neighbours
    return weights


def eq19(projection, features, labels, centres, owners, neighbours) -> float:
    """-mean_i log( sum_{z in N_i ∩ A_{k_i}} 1/d_L / sum_{z in N_i} 1/d_L ), written out."""
    projected = features @ projection.T
    total = 0.0
    for i in range(len(features)):
        d = ((projected[i] - centres) ** 2).sum(-1).sqrt()
        nearest = d.argsort()[:neighbours]
        inverse = 1.0 / d[nearest]
        own = owners[nearest] == labels[i]
        total += -torch.log(inverse[own].sum().clamp_min(1e-12) / inverse.sum())
    return float(total / len(features))


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    pre = {"l.weight": torch.eye(DIM), "l.bias": torch.zeros(DIM)}
    taus = {t: {"l.weight": signed(0.5 * torch.randn(DIM, DIM, generator=g)),
                "l.bias": signed(0.5 * torch.randn(DIM, generator=g))} for t in TASKS}
    heads = {t: torch.randn(3, DIM, generator=g) for t in TASKS}
    clumps = [clumped(g, k) for k in range(len(TASKS))]
    exemplars = {t: {"x": points} for t, (points, _) in zip(TASKS, clumps)}
    means = {t: m for t, (_, m) in zip(TASKS, clumps)}
    all_means = torch.cat(list(means.values()))
    gaps = torch.cdist(all_means, all_means) + 1e9 * torch.eye(len(all_means))
    assert gaps.min() > 3.0  # clumps far apart compared with their jitter: K-means is unambiguous
    tests = {t: sample(g, k, 6) for k, t in enumerate(TASKS)}
    finetuned = {t: {k: pre[k] + taus[t][k] for k in pre} for t in TASKS}
    hp = {"steps": 2, "batch_size": 16, "reuse_training": False, "centres": E, "rank": RANK, "neighbours": C}
    with ModelPool(ToyBackbone(tmp_path_factory.mktemp("auto"), pre, finetuned, heads,
                               lambda: LinearFeatureEncoder(DIM))) as pool:
        merged = make_method("auto-flexswitch", hp).merge(pool, exemplars)
    return pre, heads, exemplars, tests, merged, means


def stored_router(merged):
    contents = decode_tensors(merged.artifacts()["router.mbc"])
    return (contents.dense("projection", torch.float32), contents.dense("centres", torch.float32),
            contents.dense("owners", torch.int64), contents.metadata["neighbours"])


def test_router_stores_the_learned_metric_and_every_projected_centre(auto):
    """The stored centres are L mu for the E K-means centres mu of each task's pretrained
    features (here the clump means), each owned by its task; L is r x e; C is stored."""
    *_, merged, means = auto
    projection, centres, owners, neighbours = stored_router(merged)
    assert projection.shape == (RANK, DIM) and neighbours == C and len(centres) == len(owners) == E * len(TASKS)
    for k, task in enumerate(TASKS):
        expected = means[task] @ projection.T  # pretrained features are the inputs
        mine = centres[owners == k]
        assert len(mine) == E
        distances = torch.cdist(expected, mine)
        assert distances.min(1).values.max() < 1e-4 and distances.min(0).values.max() < 1e-4, task


def test_stored_metric_is_what_eq19_training_reached(auto):
    """The record's final Eq. 19 loss is Eq. 19 of the stored L, and training lowered it:
    the stored L is the learned one, not its initial value."""
    _, _, exemplars, _, merged, _ = auto
    projection, centres, owners, neighbours = stored_router(merged)
    features = torch.cat([exemplars[t]["x"] for t in TASKS])
    labels = torch.arange(len(TASKS)).repeat_interleave(N)
    record = merged.diagnostics()["flexswitch"]["metric"]
    assert record["loss_end"] == pytest.approx(eq19(projection, features, labels, centres, owners, neighbours),
                                               rel=1e-4, abs=1e-6)
    assert record["loss_end"] < 0.8 * record["loss_start"]


def test_each_input_is_composed_with_its_knn_weights_under_the_learned_metric(auto):
    """predict() = head_task(f(x; theta + sum_k w_k(x) tau~_k)), w from k-NN over the C nearest
    projected centres (Eqs. 5, 18), tau~_k the stored switches; routing with the raw features
    (L ignored) gives other weights for some inputs, and those would predict differently."""
    pre, heads, exemplars, tests, merged, means = auto
    projection, centres, owners, neighbours = stored_router(merged)
    switches = [{key: t.to_dense() for key, t in decode_tensors(merged.artifacts()[f"{task}.sass"]).items()}
                for task in TASKS]
    raw = torch.cat([means[t] for t in TASKS])  # the centres before projection
    raw_owners = torch.arange(len(TASKS)).repeat_interleave(E)
    ignored_l_differs = mixed = 0
    for k, task in enumerate(TASKS):
        x = tests[task]
        weights = knn_weights(x @ projection.T, centres, owners, neighbours)
        assert torch.allclose(weights.sum(1), torch.ones(len(x)))
        mixed += int(((weights > 0).sum(1) > 1).sum())

        def composed(all_weights):
            out = []
            for row, w in zip(x, all_weights):
                params = {key: pre[key] + sum(w[j] * switches[j][key] for j in range(len(TASKS))) for key in pre}
                out.append((params["l.weight"] @ row + params["l.bias"]) @ heads[task].T)
            return torch.stack(out)

        got = merged.predict(task, {"x": x})
        torch.testing.assert_close(got, composed(weights), rtol=1e-5, atol=1e-5)
        raw_weights = knn_weights(x, raw, raw_owners, neighbours)
        differs = (raw_weights != weights).any(1)
        ignored_l_differs += int(differs.sum())
        if differs.any():
            assert (composed(raw_weights)[differs] - got[differs]).abs().max() > 1e-3
    assert ignored_l_differs > 0 and mixed > 0  # L matters, and some inputs mix several switches
    accuracy = merged.diagnostics()["routing_accuracy"]
    for k, task in enumerate(TASKS):
        own = knn_weights(tests[task] @ projection.T, centres, owners, neighbours).argmax(1) == k
        assert accuracy[task] == pytest.approx(float(own.float().mean()))
