"""Hand-computed cases for the static baselines (2 tasks, 3 tensors)."""
import pytest
import torch

from mergebench.runner import make_method
from mergebench.sparsify import elect_and_merge, magnitude_threshold
from tests._stub import finetuned_from, make_pool, merged_state, tensors

PRE = tensors(a=[1.0, 1.0, 1.0, 1.0], b=[0.0, 0.0], c=[2.0])
TAU1 = tensors(a=[1.0, -2.0, 0.5, 3.0], b=[0.1, -0.2], c=[4.0])
TAU2 = tensors(a=[-1.5, -1.0, 0.2, 2.0], b=[0.3, 0.4], c=[-5.0])


def finetuned(*taus):
    return finetuned_from(PRE, *taus)


@pytest.fixture
def pool(tmp_path):
    with make_pool(tmp_path, PRE, finetuned(TAU1, TAU2)) as pool:
        yield pool


def test_weight_averaging_is_mean_of_finetuned(pool):
    state = merged_state(make_method("weight-averaging").merge(pool))
    for key in PRE:
        assert torch.allclose(state[key], (2 * PRE[key] + TAU1[key] + TAU2[key]) / 2)
    assert state["count"].item() == 7  # integer buffers are not merged


def test_task_arithmetic_scales_summed_task_vectors(pool):
    state = merged_state(make_method("task-arithmetic", {"scaling": 0.5}).merge(pool))
    assert torch.allclose(state["a"], torch.tensor([0.75, -0.5, 1.35, 3.5]))
    assert torch.allclose(state["c"], torch.tensor([1.5]))


def test_task_arithmetic_default_scaling_is_papers_value():
    assert make_method("task-arithmetic").hparams["scaling"] == 0.3


def test_ties_trim_elect_disjoint_mean_by_hand(pool):
    # keep=0.5 of 7 entries: threshold = 4th smallest magnitude = 1.0 for both tasks, so
    # trimmed tau1: a=[1,-2,0,3] b=[0,0] c=[4];  tau2: a=[-1.5,-1,0,2] b=[0,0] c=[-5]
    # elected signs: a=[-,-,(tie->majority -),+] c=[-]; disjoint means: a=[-1.5,-1.5,0,2.5] c=[-5]
    state = merged_state(make_method("ties", {"keep": 0.5, "scaling": 1.0}).merge(pool))
    assert torch.allclose(state["a"], PRE["a"] + torch.tensor([-1.5, -1.5, 0.0, 2.5]))
    assert torch.allclose(state["b"], PRE["b"])
    assert torch.allclose(state["c"], PRE["c"] + torch.tensor([-5.0]))


def test_ties_keep_all_with_agreeing_signs_is_mean(tmp_path):
    tau2 = {k: 3 * v for k, v in TAU1.items()}  # same signs everywhere
    with make_pool(tmp_path, PRE, finetuned(TAU1, tau2)) as pool:
        state = merged_state(make_method("ties", {"keep": 1.0, "scaling": 1.0}).merge(pool))
    for key in PRE:
        assert torch.allclose(state[key], PRE[key] + 2 * TAU1[key])


def test_ties_threshold_and_election_units():
    assert magnitude_threshold(torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0]), 0.5) == 1.0
    trimmed = torch.tensor([[1.0, -2.0, 0.0], [-3.0, -1.0, 0.0]])
    assert torch.equal(elect_and_merge(trimmed), torch.tensor([-3.0, -1.5, 0.0]))


def test_ties_rejects_bad_keep(pool):
    with pytest.raises(ValueError, match="keep"):
        make_method("ties", {"keep": 0.0}).merge(pool)


def test_dare_without_drop_equals_task_arithmetic(pool):
    dare = merged_state(make_method("dare", {"drop_rate": 0.0, "scaling": 0.3}).merge(pool))
    ta = merged_state(make_method("task-arithmetic", {"scaling": 0.3}).merge(pool))
    for key in PRE:
        assert torch.allclose(dare[key], ta[key])


@pytest.fixture
def big_pool(tmp_path):
    torch.manual_seed(0)
    pre = {"w": torch.zeros(20_000)}
    with make_pool(tmp_path, pre, {"t1": {"w": torch.ones(20_000)}}) as pool:
        yield pool


def test_dare_drops_at_rate_and_rescales(big_pool):
    state = merged_state(make_method("dare", {"drop_rate": 0.7, "scaling": 1.0}).merge(big_pool))
    values = state["w"]
    kept = values != 0
    assert torch.allclose(values[kept], torch.full_like(values[kept], 1 / 0.3))
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert abs(values.mean().item() - 1.0) < 0.05  # unbiased: E[drop-and-rescale] = tau


def test_dare_is_seeded(big_pool):
    first = merged_state(make_method("dare", seed=1).merge(big_pool))["w"]
    again = merged_state(make_method("dare", seed=1).merge(big_pool))["w"]
    other = merged_state(make_method("dare", seed=2).merge(big_pool))["w"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_pretrained_reference_keeps_pretrained_weights(pool):
    state = merged_state(make_method("pretrained").merge(pool))
    for key in PRE:
        assert torch.equal(state[key], PRE[key])


def test_individual_uses_each_tasks_own_weights_and_stores_checkpoints(pool):
    merged = make_method("individual").merge(pool)
    x = {"x": torch.ones(1)}
    for task, tau in (("t1", TAU1), ("t2", TAU2)):
        expected = sum((PRE[k] + tau[k]).sum() for k in PRE)
        assert torch.allclose(merged.predict(task, x), expected.reshape(1))
    files = pool.checkpoint_paths().values()
    assert merged.storage_bytes() == sum(path.stat().st_size for path in files)


def test_static_merges_store_nothing_extra(pool):
    assert make_method("task-arithmetic").merge(pool).storage_bytes() == 0
