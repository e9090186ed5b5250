"""The shared pruning rules of mergebench.sparsify on hand-sized task vectors (P-Spar
itself is checked against the T-Switch equations in tests/test_t_switch.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebench.sparsify import drop_and_rescale, magnitude_mask, selected_entries, trim


def test_magnitude_mask_keeps_largest():
    tau = np.array([0.1, -5.0, 2.0, -0.3, 4.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(magnitude_mask(tau, 0.5), [False, True, True, False, True, False])
    assert magnitude_mask(tau, 0.0).all() and not magnitude_mask(tau, 1.0).any()
    np.testing.assert_array_equal(magnitude_mask(torch.from_numpy(tau), 0.5), magnitude_mask(tau, 0.5))


def test_trim_keeps_entries_at_their_tasks_threshold():
    stacked = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, -1.0, 0.2, 2.0]])
    trimmed = trim(stacked, torch.tensor([1.0, 2.0]))
    assert torch.equal(trimmed, torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 2.0]]))


def test_selected_entries_agree_with_the_elected_sign():
    # elected signs: sum [-0.5, -3, 0, 5] -> [-, -, majority +, +]
    trimmed = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.5, -1.0, 0.0, 2.0]])
    assert torch.equal(selected_entries(trimmed), torch.tensor([[0.0, -2.0, 0.0, 3.0], [-1.5, -1.0, 0.0, 2.0]]))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_drop_and_rescale_keeps_survivors_scaled_by_one_over_one_minus_p(p):
    tau = torch.arange(1.0, 1001.0)
    dropped = drop_and_rescale(tau, p, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert torch.allclose(dropped[kept], tau[kept] / (1.0 - p))
    assert abs(float(kept.float().mean()) - (1.0 - p)) < 0.05
    assert torch.equal(dropped, drop_and_rescale(tau, p, torch.Generator().manual_seed(0)))  # seeded
