"""Per-input vs per-batch routing of Auto-Switch and Auto-FlexSwitch: per-batch gives every
input of a batch the mean of the per-input k-NN weights (computed here by brute force) and
predicts like a static merge with those mean weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mergebench.exemplars import draw_exemplars
from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests._stub import StubBackbone, StubData


class SmallEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallBackbone(StubBackbone):
    def __init__(self, root, pretrained, finetuned):
        super().__init__(root, pretrained, finetuned, StubData())

    def build_encoder(self):
        return SmallEncoder()


@pytest.fixture
def pool(tmp_path):
    generator = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in SmallEncoder().state_dict().items() if v.is_floating_point()}
    pretrained = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    finetuned = {task: {k: v + torch.randn(v.shape, generator=generator) for k, v in pretrained.items()}
                 for task in ("t1", "t2", "t3")}
    with ModelPool(SmallBackbone(tmp_path, pretrained, finetuned)) as pool:
        yield pool


def exemplars(n: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {task: {"x": centre + 0.8 * torch.randn(n, 4, generator=generator)}
            for task, centre in (("t1", -1.0), ("t2", 0.0), ("t3", 1.0))}


def knn_weights(pool, queries: dict[str, dict[str, torch.Tensor]], x: torch.Tensor, c: int) -> torch.Tensor:
    """|Q_k ∩ N_x| / C over the C nearest pretrained features, by brute force."""
    encoder = SmallEncoder()
    encoder.load_state_dict(pool.pretrained_state())
    with torch.no_grad():
        features = torch.cat([encoder(queries[t]["x"]) for t in pool.tasks])
        owners = torch.cat([torch.full((len(queries[t]["x"]),), k) for k, t in enumerate(pool.tasks)])
        probe = encoder(x)
    distances = ((probe[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    nearest = distances.argsort(1)[:, :c]
    return torch.stack([(owners[nearest] == k).float().mean(1) for k in range(len(pool.tasks))], 1)


def switched_task_vector(tau: torch.Tensor) -> torch.Tensor:
    """alpha = 0: A keeps every non-zero entry, P = sign, beta = ||tau|| / sqrt(nnz)."""
    nonzero = tau != 0
    if not nonzero.any():
        return torch.zeros_like(tau)
    return tau.norm() / nonzero.sum().sqrt() * torch.sign(tau)


def test_per_batch_weights_are_the_batch_mean_and_predict_as_a_static_merge(pool):
    queries = exemplars()
    hp = {"alpha": 0.0, "exemplars": 8, "neighbours": 5, "query_model": "pretrained"}  # knn_weights: pretrained features
    per_input = make_method("auto-switch", hp).merge(pool, queries)
    per_batch = make_method("auto-switch", {**hp, "routing": "per-batch"}).merge(pool, queries)
    probe = torch.cat([queries["t1"]["x"][:3], queries["t3"]["x"][:3], torch.zeros(1, 4)])
    expected = knn_weights(pool, queries, probe, 5)
    assert len(torch.unique(expected, dim=0)) > 1  # the inputs disagree: the mean is not any one row
    assert torch.allclose(per_input.routing_weights("t1", {"x": probe}), expected)
    batch_weights = per_batch.routing_weights("t1", {"x": probe})
    assert torch.allclose(batch_weights, expected.mean(0, keepdim=True).expand_as(expected))
    # prediction: theta_pre + sum_k mean_w_k tau_hat_k for every input, one composition
    mean = expected.mean(0)
    params = {key: pool.pretrained(key) + sum(mean[k] * switched_task_vector(pool.task_vector(t, key))
                                              for k, t in enumerate(pool.tasks))
              for key in pool.merged_keys}
    reference = functional_call(SmallEncoder(), {**pool.pretrained_state(), **params}, (probe,))
    before = per_batch.materialisations
    assert torch.allclose(per_batch.predict("t1", {"x": probe}), reference, atol=1e-5)
    assert per_batch.materialisations - before <= 1
    assert not torch.allclose(per_input.predict("t1", {"x": probe}), reference, atol=1e-3)


def test_routing_defaults_and_choices():
    for name in ("auto-switch", "auto-flexswitch"):
        assert make_method(name).hparams["routing"] == "per-input"
        with pytest.raises(ValueError, match="routing"):
            make_method(name, {"routing": "per-task"})


def test_auto_flexswitch_per_batch_is_the_mean_of_its_per_input_weights(tiny_bert):
    hp = {"steps": 2, "exemplars": 8, "batch_size": 4, "decay": 0.7, "centres": 2, "rank": 2, "metric_epochs": 2,
          "neighbours": 3}
    tasks = [t.name for t in tiny_bert.tasks]
    drawn = draw_exemplars(tiny_bert, tasks, 8, 0)
    with ModelPool(tiny_bert, tasks) as pool:
        per_input = make_method("auto-flexswitch", hp).merge(pool, drawn)
        per_batch = make_method("auto-flexswitch", {**hp, "routing": "per-batch"}).merge(pool, drawn)
    inputs = {key: torch.cat([drawn[t][key] for t in tasks]) for key in drawn[tasks[0]]}  # every task's exemplars
    weights = per_input.routing_weights(tasks[0], inputs)
    assert len(torch.unique(weights, dim=0)) > 1  # the inputs disagree: the mean is not any one row
    averaged = per_batch.routing_weights(tasks[0], inputs)
    assert torch.allclose(averaged, weights.mean(0, keepdim=True).expand_as(weights))
    composed = per_batch.predict(tasks[0], inputs)
    single = per_input.features(inputs, averaged)  # the per-input model composed with the mean weights
    assert torch.allclose(composed, per_input.head(tasks[0])(single), atol=1e-5)
