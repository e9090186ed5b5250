"""RegMean on a hand-checkable encoder: the encoder is one nn.Linear(3, 2) applied to
the raw inputs, so the Gram of its inputs is the Gram of the exemplars themselves."""
from __future__ import annotations

import pytest
import torch

from mergebench.methods.regmean import scale_off_diagonal
from mergebench.runner import make_method
from tests._stub import merged_state
from tests.test_fisher import B, T1, T2, W, linear_pool

E = torch.eye(3)


def regmean(pool, exemplars, alpha):
    return merged_state(make_method("regmean", {"alpha": alpha}).merge(pool, exemplars))


def test_one_hot_inputs_closed_form_by_hand(tmp_path):
    # t1 sees e0, e0, e1 -> G1 = diag(2/3, 1/3, 0); t2 sees e1, e2 -> G2 = diag(0, 1/2, 1/2).
    # Diagonal Grams decouple the columns: W[:, 0] = W1[:, 0]; W[:, 2] = W2[:, 2];
    # W[:, 1] = (1/3 W1 + 1/2 W2) / (5/6) = 0.4 W1 + 0.6 W2.
    exemplars = {"t1": {"x": E[[0, 0, 1]]}, "t2": {"x": E[[1, 2]]}}
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        state = regmean(pool, exemplars, alpha=1.0)
    w1, w2 = T1[W], T2[W]
    expected = torch.stack([w1[:, 0], 0.4 * w1[:, 1] + 0.6 * w2[:, 1], w2[:, 2]], dim=1)
    assert torch.allclose(state[W], expected, atol=1e-6)
    assert torch.allclose(state[B], (T1[B] + T2[B]) / 2)  # biases averaged
    assert state["count"].item() == 7  # integer buffers keep their pretrained value


def test_correlated_inputs_by_hand_with_alpha_one(tmp_path):
    # t1: x = (1, 1, 0) and (1, 0, 0) -> G1 = [[1, 1/2, 0], [1/2, 1/2, 0], [0, 0, 0]]
    # t2: x = (0, 0, 1)              -> G2 = [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    # (G1 + G2) is block diagonal, the (0, 1) block is G1's, so W[:, :2] = W1[:, :2] and
    # W[:, 2] = W2[:, 2]: each model keeps the columns only it sees.
    exemplars = {"t1": {"x": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}, "t2": {"x": E[[2]]}}
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        state = regmean(pool, exemplars, alpha=1.0)
    expected = torch.cat([T1[W][:, :2], T2[W][:, 2:]], dim=1)
    assert torch.allclose(state[W], expected, atol=1e-6)


def test_identical_grams_give_the_mean_of_weights(tmp_path):
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 1.0], [-1.5, 0.5, 2.0], [2.0, 0.0, 1.0]])
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        for alpha in (1.0, 0.9, 0.3):
            state = regmean(pool, {"t1": {"x": x}, "t2": {"x": x}}, alpha)
            assert torch.allclose(state[W], (T1[W] + T2[W]) / 2, atol=1e-6)


def test_scale_off_diagonal():
    g = torch.tensor([[4.0, 2.0, -1.0], [2.0, 3.0, 0.5], [-1.0, 0.5, 2.0]])
    expected = torch.tensor([[4.0, 1.8, -0.9], [1.8, 3.0, 0.45], [-0.9, 0.45, 2.0]])
    assert torch.allclose(scale_off_diagonal(g, 0.9), expected)
    assert torch.equal(scale_off_diagonal(g, 1.0), g)
    assert torch.equal(scale_off_diagonal(g, 0.0), torch.diag(g.diagonal()))
    assert torch.equal(g[0, 1], torch.tensor(2.0))  # the input is left alone


def test_alpha_scales_off_diagonals_in_the_merge(tmp_path):
    # t1: x = (1, 1, 0), (1, 0, 0) -> G1 = [[1, .5, 0], [.5, .5, 0], [0, 0, 0]]
    # t2: x = (0, 1, 0), (0, 0, 1) -> G2 = diag(0, 1/2, 1/2)
    # alpha = 0.5: G~1 = [[1, .25, 0], [.25, .5, 0], [0, 0, 0]], G~2 = G2;
    # sum = [[1, .25, 0], [.25, 1, 0], [0, 0, .5]]; solve by hand for the (0, 1) block.
    x1 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    x2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        state = regmean(pool, {"t1": {"x": x1}, "t2": {"x": x2}}, alpha=0.5)
        plain = regmean(pool, {"t1": {"x": x1}, "t2": {"x": x2}}, alpha=1.0)
    w1t, w2t = T1[W].T, T2[W].T  # (in, out)
    g1 = torch.tensor([[1.0, 0.25], [0.25, 0.5]])
    g2 = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    # inverse of [[1, .25], [.25, 1]] is [[1, -.25], [-.25, 1]] / 0.9375
    inverse = torch.tensor([[1.0, -0.25], [-0.25, 1.0]]) / 0.9375
    top = inverse @ (g1 @ w1t[:2] + g2 @ w2t[:2])
    expected = torch.cat([top, w2t[2:]], dim=0).T  # feature 2 only in t2
    assert torch.allclose(state[W], expected, atol=1e-6)
    assert not torch.allclose(state[W], plain[W], atol=1e-3)  # alpha does change the merge


def test_padding_tokens_are_not_counted(tmp_path):
    # token inputs (batch, tokens, 3) with an attention mask: the padded rows hold junk
    # that would change the Grams if counted
    t1 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    m1 = torch.tensor([[1, 1], [1, 0]])
    t2 = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    m2 = torch.tensor([[1, 1]])
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        padded = regmean(pool, {"t1": {"x": t1, "attention_mask": m1}, "t2": {"x": t2, "attention_mask": m2}}, 1.0)
    # real tokens: t1 e0, e1, e0 -> G1 = diag(2/3, 1/3, 0); t2 e1, e2 -> G2 = diag(0, 1/2, 1/2)
    w1, w2 = T1[W], T2[W]
    expected = torch.stack([w1[:, 0], 0.4 * w1[:, 1] + 0.6 * w2[:, 1], w2[:, 2]], dim=1)
    assert torch.allclose(padded[W], expected, atol=1e-6)


def test_features_dead_in_every_task_take_the_mean_column(tmp_path):
    exemplars = {"t1": {"x": E[[0, 1]]}, "t2": {"x": E[[1]]}}  # the third feature is always 0
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        for alpha in (1.0, 0.9):
            state = regmean(pool, exemplars, alpha)
            assert torch.isfinite(state[W]).all()
            assert torch.allclose(state[W][:, 2], (T1[W][:, 2] + T2[W][:, 2]) / 2, atol=1e-6)
            assert torch.allclose(state[W][:, 0], T1[W][:, 0], atol=1e-6)


def test_regmean_needs_exemplars_and_a_valid_alpha(tmp_path):
    with linear_pool(tmp_path, {"t1": T1, "t2": T2}) as pool:
        with pytest.raises(ValueError, match="needs exemplars"):
            make_method("regmean").merge(pool)
        with pytest.raises(ValueError, match="alpha"):
            make_method("regmean", {"alpha": 1.5}).merge(pool, {"t1": {"x": E}, "t2": {"x": E}})


def test_regmean_registration_and_defaults():
    method = make_method("regmean")
    assert method.needs_exemplars and not method.uses_task_identity
    assert method.hparams == {"exemplars": 256, "alpha": 0.9}
    assert method.exemplars_per_task == 256
