"""EMR-Merging (Huang et al., NeurIPS 2024, §3: Elect, Mask, Rescale) through merge() and
predict() on four tasks, against the paper's equations written out in this file: the
unified task vector's sign is elected from all K tasks, its magnitude is the largest
magnitude among the tasks agreeing with that sign, M_k = (tau_k (.) tau_uni > 0) and
lambda_k = sum|tau_k| / sum|M_k (.) tau_uni| over every merged entry of the model. The echo
encoder (tests/test_code_paths_switch.py) shows the exact weights each task runs with; each
test also checks that plausible wrong wirings give other weights or other artifacts.
"""
from __future__ import annotations

import torch

from mergebench.container import decode_tensors
from mergebench.runner import make_method
from tests.test_code_paths_switch import SHAPES, echo_pool, flat, random_setup, used_parameters

K = 4


def emr_by_hand(taus, tasks=None, magnitude="max", mask="agree", rescale="global", numerator="all"):
    """(tau_uni, masks, lambdas) of the paper, or a wrong variant of one step."""
    tasks = list(range(len(taus))) if tasks is None else tasks
    unified, masks = {}, [dict() for _ in taus]
    for key in SHAPES:
        stacked = torch.stack([taus[k][key] for k in tasks])
        gamma = torch.sign(stacked.sum(0))
        agree = stacked * gamma > 0
        if magnitude == "max":
            eps = (stacked.abs() * agree).amax(0)
        elif magnitude == "max over all":
            eps = stacked.abs().amax(0)
        else:  # mean of the agreeing
            eps = (stacked.abs() * agree).sum(0) / agree.sum(0).clamp(min=1)
        unified[key] = gamma * eps
        for k, tau in enumerate(taus):
            masks[k][key] = tau[key] * unified[key] > 0 if mask == "agree" else tau[key] != 0
    lambdas = []
    for k, tau in enumerate(taus):
        def num(key):
            return (tau[key].abs() * masks[k][key]).sum() if numerator == "masked" else tau[key].abs().sum()

        def den(key):
            return (unified[key].abs() * masks[k][key]).sum()

        if rescale == "global":
            lambdas.append(sum(num(key) for key in SHAPES) / sum(den(key) for key in SHAPES))
        elif rescale == "per tensor":
            lambdas.append({key: num(key) / den(key) for key in SHAPES})
        else:  # the authors' code: sums of per-tensor means
            lambdas.append(sum(num(key) / tau[key].numel() for key in SHAPES)
                           / sum(den(key) / tau[key].numel() for key in SHAPES))
    return unified, masks, lambdas


def task_weights(pre, unified, masks, lambdas, k):
    lam = lambdas[k]
    return flat({key: pre[key] + (lam[key] if isinstance(lam, dict) else lam) * masks[k][key] * unified[key]
                 for key in SHAPES})


def conflicted_setup():
    """Four random task vectors with sign conflicts where the largest magnitude disagrees
    with the elected sign (so "max over all tasks" and "max over agreeing" differ)."""
    pre, taus = random_setup(2, K)
    conflicts = 0
    for key in SHAPES:
        s = torch.stack([t[key] for t in taus])
        sign_of_largest = torch.sign(s.gather(0, s.abs().argmax(0)[None]))[0]
        conflicts += int((sign_of_largest != torch.sign(s.sum(0))).sum())
    assert conflicts >= 2
    return pre, taus


def test_each_task_runs_with_theta_plus_lambda_k_mask_k_elected_vector(tmp_path):
    """predict() for task k uses theta + lambda_k M_k (.) tau_uni with tau_uni elected from
    all four tasks (sign of the sum, max agreeing magnitude), M_k the agreement with it and
    one lambda_k over the whole model; the wrong variants (election over three tasks, max
    over all tasks, mean of the agreeing, mask = non-zero entries, lambda per tensor, the
    masked numerator, the authors' per-tensor means) give other weights."""
    pre, taus = conflicted_setup()
    with echo_pool(tmp_path, pre, taus) as pool:
        merged = make_method("emr-merging").merge(pool)
    right = emr_by_hand(taus)
    variants = {
        "election without the last task": emr_by_hand(taus, tasks=list(range(K - 1))),
        "election without the first task": emr_by_hand(taus, tasks=list(range(1, K))),
        "magnitude max over all tasks": emr_by_hand(taus, magnitude="max over all"),
        "magnitude mean of the agreeing": emr_by_hand(taus, magnitude="mean"),
        "mask = non-zero entries": emr_by_hand(taus, mask="non-zero"),
        "lambda per tensor": emr_by_hand(taus, rescale="per tensor"),
        "lambda of per-tensor means": emr_by_hand(taus, rescale="means"),
        "masked numerator": emr_by_hand(taus, numerator="masked"),
    }
    for k in range(K):
        got = used_parameters(merged, f"t{k + 1}")
        torch.testing.assert_close(got, task_weights(pre, *right, k), rtol=1e-5, atol=1e-5)
    for name, variant in variants.items():
        worst = max(float((task_weights(pre, *variant, k) - used_parameters(merged, f"t{k + 1}")).abs().max())
                    for k in range(K))
        assert worst > 1e-3, name


def test_artifacts_hold_exactly_the_elected_vector_masks_and_rescalers(tmp_path):
    """unified.mbc is tau_uni (fp32), <task>.masks.mbc holds M_k per tensor and lambda_k in
    its metadata: what is stored is what the equations give, and nothing else."""
    pre, taus = conflicted_setup()
    with echo_pool(tmp_path, pre, taus) as pool:
        merged = make_method("emr-merging").merge(pool)
    unified, masks, lambdas = emr_by_hand(taus)
    artifacts = merged.artifacts()
    assert set(artifacts) == {"unified.mbc", *(f"t{k + 1}.masks.mbc" for k in range(K))}
    stored = decode_tensors(artifacts["unified.mbc"])
    assert set(stored) == set(SHAPES)
    for key in SHAPES:
        torch.testing.assert_close(stored.dense(key, torch.float32), unified[key])
    for k in range(K):
        contents = decode_tensors(artifacts[f"t{k + 1}.masks.mbc"])
        assert abs(contents.metadata["lambda"] - float(lambdas[k])) < 1e-6 * float(lambdas[k])
        for key in SHAPES:
            assert torch.equal(contents.dense(key, torch.bool, unified[key].shape), masks[k][key]), (k, key)
