"""Fisher Merging on a hand-checkable encoder: nn.Linear(3, 2) with an identity head
(two classes) or a fixed 2 -> 3 linear head, checkpoints as real safetensors files.
``LinearBackbone`` is shared with tests/test_regmean.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mergebench.methods.fisher import diagonal_fisher
from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests._stub import StubBackbone, StubData, merged_state

W, B = "linear.weight", "linear.bias"


class LinearEncoder(nn.Module):
    """features = W x + b; token inputs (batch, tokens, 3) are mean-pooled over the
    attention mask after the linear layer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x, attention_mask=None):
        y = self.linear(x)
        if y.dim() == 3:
            mask = torch.ones(y.shape[:2]) if attention_mask is None else attention_mask
            mask = mask.unsqueeze(-1).to(y.dtype)
            y = (y * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return y


HEAD3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # the fixed 3-class head


class FixedHeadData(StubData):
    """Every task's head is the bias-free Linear with ``weight`` (None: the identity)."""

    def __init__(self, weight=None):
        self.weight = weight

    def head(self, task):
        if self.weight is None:
            return nn.Identity()
        head = nn.Linear(2, self.weight.shape[0], bias=False)
        head.weight.data.copy_(self.weight)
        return head


class LinearBackbone(StubBackbone):
    def __init__(self, root, pretrained, finetuned, head=None):
        super().__init__(root, pretrained, finetuned, FixedHeadData(head))

    def build_encoder(self):
        return LinearEncoder()


def linear_state(weight, bias) -> dict[str, torch.Tensor]:
    return {W: torch.tensor(weight, dtype=torch.float32), B: torch.tensor(bias, dtype=torch.float32)}


PRE = linear_state([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0])
T1 = linear_state([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]], [0.1, -0.2])
T2 = linear_state([[-0.4, 1.2, 0.5], [0.9, -0.3, 0.7]], [0.3, 0.4])
X1 = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0], [-1.5, 0.5, 2.0]])
X2 = torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 1.0], [0.0, -2.0, 0.5], [-1.0, 0.5, 0.0]])


def linear_pool(tmp_path, finetuned, head=None) -> ModelPool:
    return ModelPool(LinearBackbone(tmp_path, PRE, finetuned, head))


def fisher_by_hand(state, x, head=None):
    """Per example and class, torch.autograd on log softmax(head(W x + b)), squared and
    weighted by p(y|x), averaged over the examples."""
    weight = state[W].clone().requires_grad_(True)
    bias = state[B].clone().requires_grad_(True)
    fisher = {W: torch.zeros(2, 3), B: torch.zeros(2)}
    for row in x:
        logits = weight @ row + bias
        if head is not None:
            logits = head @ logits
        log_probs = torch.log_softmax(logits, -1)
        for c in range(log_probs.numel()):
            gw, gb = torch.autograd.grad(log_probs[c], (weight, bias), retain_graph=True)
            p = log_probs[c].exp().detach()
            fisher[W] += p * gw**2
            fisher[B] += p * gb**2
    return {k: v / len(x) for k, v in fisher.items()}


def norm(fisher):
    return torch.sqrt(sum((f**2).sum() for f in fisher.values()))


@pytest.mark.parametrize("head", [None, HEAD3], ids=["identity-head", "3-class-head"])
def test_fisher_merge_is_fisher_weighted_average_by_hand(tmp_path, head):
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}, head) as pool:
        state = merged_state(
            make_method("fisher", {"normalize": False}).merge(pool, {"t1": {"x": X1}, "t2": {"x": X2}})
        )
    f1, f2 = fisher_by_hand(T1, X1, head), fisher_by_hand(T2, X2, head)
    for key in (W, B):
        assert (f1[key] > 1e-6).all() and (f2[key] > 1e-6).all()  # the floor plays no part
        expected = (f1[key] * T1[key] + f2[key] * T2[key]) / (f1[key] + f2[key])
        assert torch.allclose(state[key], expected, atol=1e-6)
    assert state["count"].item() == 7  # integer buffers keep their pretrained value


def test_fisher_normalisation_divides_each_fisher_by_its_l2_norm(tmp_path):
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        state = merged_state(make_method("fisher").merge(pool, {"t1": {"x": X1}, "t2": {"x": X2}}))
    f1, f2 = fisher_by_hand(T1, X1), fisher_by_hand(T2, X2)
    c1, c2 = 1 / norm(f1), 1 / norm(f2)
    for key in (W, B):
        expected = (c1 * f1[key] * T1[key] + c2 * f2[key] * T2[key]) / (c1 * f1[key] + c2 * f2[key])
        assert torch.allclose(state[key], expected, atol=1e-6)


def test_per_example_fisher_closed_form_two_classes():
    # d log p_c / d logits = e_c - p, so with 2 classes sum_c p_c (e_c - p)_j^2 = p_j (1 - p_j):
    # F_W[j, i] = mean_n p_j(1-p_j) x_i^2 and F_b[j] = mean_n p_j(1-p_j) -- per example,
    # not the square of a batch gradient.
    encoder = LinearEncoder()
    encoder.load_state_dict({**T1, "count": torch.tensor([7])})
    fisher = diagonal_fisher(encoder, nn.Identity(), {"x": X1})
    p = torch.softmax(X1 @ T1[W].T + T1[B], -1)
    v = p * (1 - p)  # (examples, 2)
    assert torch.allclose(fisher[W], (v.T @ X1**2) / 3, atol=1e-6)
    assert torch.allclose(fisher[B], v.mean(0), atol=1e-6)
    batch_squared = ((v.T @ X1) / 3) ** 2  # what squaring a mean gradient would give instead
    assert not torch.allclose(fisher[W], batch_squared, atol=1e-3)


def test_equal_fishers_give_the_plain_average(tmp_path):
    # swapping the two output rows swaps p_0 and p_1; p_j(1-p_j) is unchanged, so on the
    # same exemplars both models have exactly the same Fisher
    swapped = {W: T1[W].flip(0), B: T1[B].flip(0)}
    with linear_pool(tmp_path, {"t1": T1, "t2": swapped}) as pool:
        state = merged_state(make_method("fisher").merge(pool, {"t1": {"x": X1}, "t2": {"x": X1}}))
    for key in (W, B):
        assert torch.allclose(state[key], (T1[key] + swapped[key]) / 2, atol=1e-6)


def test_zero_fisher_entries_fall_back_to_the_plain_average(tmp_path):
    # the third input is 0 on every exemplar, so F_W[:, 2] = 0 in both models; with the
    # default normalisation (different ||F_k||) the plain mean is still what they get
    x1, x2 = X1.clone(), X2.clone()
    x1[:, 2] = 0.0
    x2[:, 2] = 0.0
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        state = merged_state(make_method("fisher").merge(pool, {"t1": {"x": x1}, "t2": {"x": x2}}))
    f1, f2 = fisher_by_hand(T1, x1), fisher_by_hand(T2, x2)
    assert (f1[W][:, 2] == 0).all() and (f2[W][:, 2] == 0).all()
    assert not torch.isclose(norm(f1), norm(f2))
    assert torch.allclose(state[W][:, 2], (T1[W][:, 2] + T2[W][:, 2]) / 2)
    c1, c2 = 1 / norm(f1), 1 / norm(f2)
    informed = (c1 * f1[W] * T1[W] + c2 * f2[W] * T2[W]) / (c1 * f1[W] + c2 * f2[W])
    assert torch.allclose(state[W][:, :2], informed[:, :2], atol=1e-6)


def test_tensors_identical_in_every_model_are_kept_and_not_differentiated(tmp_path):
    same_bias = {W: T2[W], B: T1[B]}  # the bias is "frozen": equal in both fine-tuned models
    with linear_pool(tmp_path, {"t1": T1, "t2": same_bias}) as pool:
        state = merged_state(make_method("fisher").merge(pool, {"t1": {"x": X1}, "t2": {"x": X2}}))
    assert torch.equal(state[B], T1[B])
    f1 = fisher_by_hand(T1, X1)
    f2 = fisher_by_hand(same_bias, X2)
    c1, c2 = 1 / torch.sqrt((f1[W] ** 2).sum()), 1 / torch.sqrt((f2[W] ** 2).sum())  # norms over W only
    expected = (c1 * f1[W] * T1[W] + c2 * f2[W] * T2[W]) / (c1 * f1[W] + c2 * f2[W])
    assert torch.allclose(state[W], expected, atol=1e-6)


def test_token_inputs_with_padding(tmp_path):
    # per example, the padded token (mask 0) changes nothing: same as the unpadded example
    tokens = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], [[2.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    encoder = LinearEncoder()
    encoder.load_state_dict({**T1, "count": torch.tensor([7])})
    padded = diagonal_fisher(encoder, nn.Identity(), {"x": tokens, "attention_mask": mask})
    first = diagonal_fisher(encoder, nn.Identity(), {"x": tokens[:1], "attention_mask": mask[:1]})
    second = diagonal_fisher(encoder, nn.Identity(), {"x": tokens[1:, :1], "attention_mask": mask[1:, :1]})
    for key in (W, B):
        assert torch.allclose(padded[key], (first[key] + second[key]) / 2, atol=1e-6)


def test_fisher_needs_exemplars(tmp_path):
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        with pytest.raises(ValueError, match="needs exemplars"):
            make_method("fisher").merge(pool)
        with pytest.raises(ValueError, match="no exemplars for task 't2'"):
            make_method("fisher").merge(pool, {"t1": {"x": X1}})
        with pytest.raises(ValueError, match="fisher_floor"):
            make_method("fisher", {"fisher_floor": 0.0}).merge(pool, {"t1": {"x": X1}, "t2": {"x": X2}})


def test_fisher_registration_and_defaults():
    method = make_method("fisher")
    assert method.needs_exemplars and not method.uses_task_identity
    assert method.hparams == {"exemplars": 256, "fisher_floor": 1e-6, "normalize": True}
    assert method.exemplars_per_task == 256


def test_regression_head_fisher_is_the_squared_output_gradient():
    # one output f = w.x + b under a unit-variance Gaussian: F_w = mean_n x_n^2, F_b = 1
    encoder = nn.Linear(3, 1)
    x = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    fisher = diagonal_fisher(encoder, nn.Identity(), {"input": x})
    assert torch.allclose(fisher["weight"], (x**2).mean(0, keepdim=True))
    assert torch.allclose(fisher["bias"], torch.ones(1))
