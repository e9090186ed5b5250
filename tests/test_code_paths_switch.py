"""T-Switch and Auto-Switch (T-Switch CVPR 2025 Eqs. 2-4 and 8; Auto-FlexSwitch Eqs. 2-5)
through their public path, merge() then predict(), against the equations written out in
this file. The toy encoder echoes the parameters it runs with (its features for an input x
are x times every parameter entry), so a prediction shows exactly the weights inference
composed; each test also checks that a plausible wrong wiring gives other weights.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests._stub import StubBackbone

SHAPES = {"a": (3, 4), "b": (6,), "c": (3,)}


class EchoEncoder(nn.Module):
    """features(x) = x * concat(every parameter, flattened, in SHAPES order)."""

    def __init__(self, shapes=SHAPES):
        super().__init__()
        self.names = list(shapes)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        return x[:, None] * torch.cat([getattr(self, name).flatten() for name in self.names])


class EchoBackbone(StubBackbone):
    """Identity heads: predict() returns the composed parameters times the input."""

    def build_encoder(self):
        return EchoEncoder({k: tuple(v) for k, v in self.shapes.items()})


def flat(state) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in SHAPES])


def echo_pool(tmp_path, pre, taus) -> ModelPool:
    finetuned = {f"t{i}": {k: pre[k] + tau[k] for k in pre} for i, tau in enumerate(taus, 1)}
    return ModelPool(EchoBackbone(tmp_path, pre, finetuned))


def random_setup(seed: int, tasks: int, zeros: bool = True):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    taus = []
    for _ in range(tasks):
        tau = {k: torch.randn(s, generator=g) * (1.0 + 2.0 * i) for i, (k, s) in enumerate(SHAPES.items())}
        if zeros:  # unchanged entries: counted by no norm, kept by no mask
            for k in tau:
                tau[k].view(-1)[torch.rand(tau[k].numel(), generator=g) < 0.25] = 0.0
        taus.append(tau)
    return pre, taus


def used_parameters(merged, task: str, x: float = 1.0) -> torch.Tensor:
    return merged.predict(task, {"x": torch.tensor([x])})[0] / x


# --------------------------------------------------------------------------- T-Switch


def eq3_switch(tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """beta A (.) P of one tensor: A keeps the positive entries above the alpha-quantile of
    the positives and the negative ones below that of the negatives (Eq. 2, per sign), P =
    sign with 0 -> -1 (Eq. 4), beta = ||tau (.) A||_2 / ||A (.) P||_2 (Eq. 3)."""
    keep = torch.zeros_like(tau, dtype=torch.bool)
    for side in (tau > 0, tau < 0):
        magnitudes = tau[side].abs().sort().values
        drop = int(alpha * len(magnitudes))
        if len(magnitudes):
            level = magnitudes[drop - 1] if drop else -1.0
            keep |= side & (tau.abs() > level)
    polarity = torch.where(tau > 0, 1.0, -1.0)
    beta = (tau * keep).norm() / (keep * polarity).norm()
    return beta * keep * polarity


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_t_switch_composes_theta_plus_eq3_switch_of_the_known_task(tmp_path, alpha):
    """theta_k = theta + beta_k^l A_k^l (.) P_k^l per tensor l (Eq. 3; at alpha = 0 the one-bit
    sign approximation of the whole task vector). Wrong wirings that give other weights:
    beta over all entries (sqrt(n) instead of sqrt(kept)), one beta for the whole model, the
    mean |tau| as the knob, a magnitude quantile over both signs together, another task's switch."""
    pre, taus = random_setup(0, 3)
    with echo_pool(tmp_path, pre, taus) as pool:
        merged = make_method("t-switch", {"alpha": alpha}).merge(pool)
    for k, tau in enumerate(taus):
        got = used_parameters(merged, f"t{k + 1}")
        expected = flat({key: pre[key] + eq3_switch(tau[key], alpha) for key in SHAPES})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

        wrong = {}
        switches = {key: eq3_switch(tau[key], alpha) for key in SHAPES}
        masks = {key: switches[key] != 0 for key in SHAPES}
        wrong["beta over every entry"] = {key: switches[key] * (masks[key].sum() / tau[key].numel()) ** 0.5
                                          for key in SHAPES}
        kept = torch.cat([(tau[key] * masks[key]).flatten() for key in SHAPES])
        count = sum(int(masks[key].sum()) for key in SHAPES)
        wrong["one beta for the model"] = {key: masks[key] * torch.where(tau[key] > 0, 1.0, -1.0) * kept.norm()
                                           / count**0.5 for key in SHAPES}
        wrong["mean |tau| as the knob"] = {key: masks[key] * torch.sign(tau[key]) * tau[key][masks[key]].abs().mean()
                                           for key in SHAPES}
        if alpha > 0:
            def both_signs(t):
                level = t[t != 0].abs().sort().values[int(alpha * int((t != 0).sum())) - 1]
                m = t.abs() > level
                p = torch.where(t > 0, 1.0, -1.0)
                return (t * m).norm() / (m * p).norm() * m * p
            wrong["quantile over both signs"] = {key: both_signs(tau[key]) for key in SHAPES}
        other = taus[(k + 1) % len(taus)]
        wrong["another task's switch"] = {key: eq3_switch(other[key], alpha) for key in SHAPES}
        for name, switch in wrong.items():
            assert (flat({key: pre[key] + switch[key] for key in SHAPES}) - got).abs().max() > 1e-3, name


# --------------------------------------------------------------------------- Auto-Switch

QUERIES = {"t1": [1.0, 1.1, 1.25, 1.3], "t2": [2.0, 2.2, 2.3, 2.35], "t3": [3.0, 3.05, 3.1, 3.4]}


def test_auto_switch_composes_with_the_share_of_c_neighbours_per_task(tmp_path):
    """Eq. 8 (Auto-FlexSwitch Eq. 5): w_k(x) = |Q_k ∩ N_x| / C, N_x the C nearest query
    features (pretrained encoder, Euclidean) of x's pretrained features; theta(x) = theta +
    sum_k w_k(x) beta_k A_k (.) P_k, each input of a batch with its own weights. Wrong
    wirings: one-hot on the nearest task, C + 1 neighbours, one weight vector for the batch."""
    pre, taus = random_setup(1, 3)
    exemplars = {task: {"x": torch.tensor(values)} for task, values in QUERIES.items()}
    alpha, c = 0.5, 3
    with echo_pool(tmp_path, pre, taus) as pool:
        merged = make_method("auto-switch", {"alpha": alpha, "neighbours": c}).merge(pool, exemplars)
    x = torch.tensor([1.05, 1.6, 1.72, 2.62, 2.75, 3.3, 0.2])
    got = merged.predict("t1", {"x": x}) / x[:, None]

    pre_flat = flat(pre)
    queries = torch.cat([torch.tensor(v)[:, None] * pre_flat for v in QUERIES.values()])
    owners = torch.arange(3).repeat_interleave(4)
    switches = torch.stack([flat({key: eq3_switch(tau[key], alpha) for key in SHAPES}) for tau in taus])

    def composed(weights):
        return pre_flat + weights @ switches

    def weights_for(neighbours):
        distances = ((x[:, None, None] * pre_flat - queries[None]) ** 2).sum(-1)
        nearest = distances.argsort(1)[:, :neighbours]
        return torch.stack([(owners[nearest] == k).float().mean(1) for k in range(3)], 1)

    weights = weights_for(c)
    assert ((weights > 0).sum(1) > 1).sum() >= 3  # several inputs mix two switches
    torch.testing.assert_close(got, composed(weights), rtol=1e-5, atol=1e-5)
    one_hot = torch.nn.functional.one_hot(weights.argmax(1), 3).float()
    for name, wrong in {"one-hot on the top task": one_hot, "C + 1 neighbours": weights_for(c + 1),
                        "batch-mean weights": weights.mean(0, keepdim=True).expand_as(weights)}.items():
        assert (composed(wrong) - got).abs().max() > 1e-3, name
