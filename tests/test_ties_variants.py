"""TIES dis-sum and dis-mean through the method's ``merge`` on a hand-made 3-task pool,
against an independent implementation written here (global top-k trim per task vector,
sign of the summed trimmed values, disjoint sum / mean), and AdaMerging++'s TIES step."""
import numpy as np
import pytest
import torch

from mergebench.errors import HyperparameterError
from mergebench.runner import make_method
from tests._stub import finetuned_from, make_pool, merged_state, tensors

PRE = tensors(a=[0.5, -1.0, 2.0, 0.0, 1.0], b=[1.0, 1.0, -1.0], c=[0.25, 0.0])
TAUS = (
    tensors(a=[0.9, -0.1, 0.4, -0.7, 0.05], b=[0.3, -0.6, 0.2], c=[0.8, -0.25]),
    tensors(a=[-0.2, -0.5, 0.6, 0.35, -0.9], b=[-0.45, 0.15, 0.7], c=[-0.1, 0.55]),
    tensors(a=[0.3, 0.65, -0.05, -0.4, 0.12], b=[0.5, -0.85, -0.22], c=[0.6, 0.02]),
)
KEYS = ("a", "b", "c")


def reference_ties(keep: float, merge_func: str) -> dict[str, np.ndarray]:
    """The TIES merge of TAUS in numpy: each task vector flattened over all tensors keeps its
    entries with |tau| >= the k-th largest magnitude (k = n - int(n (1 - keep)) smallest dropped,
    as ``topk_values_mask``), the sign of each entry is the sign of the summed trimmed values,
    and the agreeing values are summed or averaged."""
    flat = np.stack([np.concatenate([tau[k].numpy() for k in KEYS]) for tau in TAUS]).astype(np.float64)
    n = flat.shape[1]
    kth = max(n - int(n * keep), 1)  # the kth smallest magnitude is the threshold
    thresholds = np.sort(np.abs(flat), axis=1)[:, kth - 1]
    trimmed = np.where(np.abs(flat) >= thresholds[:, None], flat, 0.0)
    sign = np.sign(trimmed.sum(0))
    assert (sign != 0).all()  # the example has no exact ties (the majority rule is tested elsewhere)
    agree = np.sign(trimmed) == sign
    summed = (trimmed * agree).sum(0)
    merged = summed if merge_func == "sum" else summed / np.maximum(agree.sum(0), 1)
    out, start = {}, 0
    for key in KEYS:
        size = PRE[key].numel()
        out[key] = merged[start:start + size]
        start += size
    return out


@pytest.fixture
def pool(tmp_path):
    with make_pool(tmp_path, PRE, finetuned_from(PRE, *TAUS)) as pool:
        yield pool


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("keep", [0.5, 0.3, 1.0])
def test_ties_merge_equals_independent_disjoint_merge(pool, keep, merge_func):
    scaling = 0.3
    state = merged_state(make_method("ties", {"keep": keep, "scaling": scaling, "merge_func": merge_func}).merge(pool))
    expected = reference_ties(keep, merge_func)
    for key in KEYS:
        want = PRE[key].double().numpy() + scaling * expected[key]
        np.testing.assert_allclose(state[key].double().numpy(), want, rtol=1e-6, atol=1e-7)


def test_dis_sum_differs_from_dis_mean_where_tasks_agree(pool):
    # at keep = 1 every entry is kept; where 2 or 3 tasks agree the sum is 2-3x the mean
    sums = merged_state(make_method("ties", {"keep": 1.0, "scaling": 1.0, "merge_func": "sum"}).merge(pool))
    means = merged_state(make_method("ties", {"keep": 1.0, "scaling": 1.0, "merge_func": "mean"}).merge(pool))
    flat = np.stack([np.concatenate([tau[k].numpy() for k in KEYS]) for tau in TAUS])
    agreeing = (np.sign(flat) == np.sign(flat.sum(0))).sum(0)
    ratio = np.concatenate([(sums[k] - PRE[k]).numpy() for k in KEYS]) / \
        np.concatenate([(means[k] - PRE[k]).numpy() for k in KEYS])
    np.testing.assert_allclose(ratio, agreeing, rtol=1e-5)
    assert agreeing.max() >= 2


def test_ties_merge_func_default_and_bad_value():
    assert make_method("ties").hparams["merge_func"] == "mean"
    with pytest.raises(HyperparameterError, match="merge_func"):
        make_method("ties", {"merge_func": "max"})


def test_adamerging_pp_ties_step_sum_and_mean(pool):
    """With no steps the merge is theta_pre + init * sum_k v_k. "sum": v_k are the selected
    entries as they are (the authors' ``disjoint_merge_split``), so the merge is init * dis-sum;
    "mean": each selected entry divided by its count of agreeing tasks, so it is init * dis-mean."""
    assert make_method("adamerging++").hparams["merge_func"] == "sum"
    for merge_func in ("sum", "mean"):
        method = make_method("adamerging++", {"keep": 0.5, "steps": 0, "init": 0.3, "merge_func": merge_func})
        state = merged_state(method.merge(pool))
        expected = reference_ties(0.5, merge_func)
        for key in KEYS:
            want = PRE[key].double().numpy() + 0.3 * expected[key]
            np.testing.assert_allclose(state[key].double().numpy(), want, rtol=1e-6, atol=1e-7)
