"""The defining step of each data-dependent or election-based baseline, pinned through
merge() against a small computation written out in this file, on the two-layer toy encoder
of tests/test_code_paths_flexswitch.py with a different head per task:

* AdaMerging (Yang et al., ICLR 2024; authors' ``main_layer_wise_adamerging.py``): one
  coefficient per task and tensor, clamped to [0, 1], Adam on the sum over tasks of the
  mean prediction entropy of each task's inputs under its own head; the merged model is
  theta + sum_k clamp(lambda_k^l) tau_k^l with the learned coefficients.
* Fisher Merging (Matena & Raffel, NeurIPS 2022): each model's exact diagonal Fisher on its
  own task's inputs through its own head, normalised, as weights of the average.
* RegMean (Jin et al., ICLR 2023): per linear layer, W = (sum G~_k)^-1 sum G~_k W_k with G_k
  the Gram of that layer's inputs in fine-tuned model k.
* TIES-Merging (Yadav et al., NeurIPS 2023): trim over the whole task vector, elect the
  sign of the sum, disjoint mean or sum.
Each test also checks that plausible wrong wirings give a measurably different result.
"""
from __future__ import annotations

import pytest
import torch

from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests.test_code_paths_flexswitch import D_IN, HIDDEN, MLPEncoder, ToyBackbone, mlp, signed

TASKS = ("t1", "t2", "t3")
KEYS = ("l1.weight", "l1.bias", "l2.weight", "l2.bias")


def setup(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    shapes = {"l1.weight": (HIDDEN, D_IN), "l1.bias": (HIDDEN,), "l2.weight": (4, HIDDEN), "l2.bias": (4,)}
    pre = {k: 0.6 * torch.randn(s, generator=g) for k, s in shapes.items()}
    taus = {t: {k: signed(0.5 * torch.randn(s, generator=g)) for k, s in shapes.items()} for t in TASKS}
    heads = {t: torch.randn(3, 4, generator=g) for t in TASKS}
    inputs = {t: 1.5 * torch.randn(n, D_IN, generator=g) for t in TASKS}
    return pre, taus, heads, inputs


def toy_pool(path, pre, taus, heads) -> ModelPool:
    finetuned = {t: {k: pre[k] + taus[t][k] for k in pre} for t in TASKS}
    return ModelPool(ToyBackbone(path, pre, finetuned, heads, MLPEncoder))


def state_of(merged) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in merged.encoder.state_dict().items() if k in KEYS}


def far(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in KEYS)


# --------------------------------------------------------------------------- AdaMerging


def entropy(logits):
    p = torch.softmax(logits, -1)
    return -(p * torch.log_softmax(logits, -1)).sum(-1)


def adamerging_by_hand(pre, taus, heads, inputs, *, steps, lr, init, clamp=True, per_tensor=True, heads_of=None,
                       ascend=False):
    """Layer-wise AdaMerging on full batches; the wrong variants: task-wise coefficients,
    another task's head, entropy maximised, no clamp."""
    heads_of = heads_of or {t: t for t in TASKS}
    shape = (len(TASKS), len(KEYS)) if per_tensor else (len(TASKS), 1)
    lam = torch.full(shape, float(init), requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))

    def merged():
        c = lam.clamp(0.0, 1.0) if clamp else lam
        c = c if per_tensor else c.expand(len(TASKS), len(KEYS))
        return {key: pre[key] + sum(c[k, l] * taus[t][key] for k, t in enumerate(TASKS)) for l, key in enumerate(KEYS)}

    for _ in range(steps):
        params = merged()
        loss = sum(entropy(mlp(params, inputs[t]) @ heads[heads_of[t]].T).mean() for t in TASKS)
        optimizer.zero_grad()
        (-loss if ascend else loss).backward()
        optimizer.step()
    with torch.no_grad():
        return merged(), (lam.clamp(0.0, 1.0) if clamp else lam).detach()


def test_adamerging_learns_layer_wise_coefficients_on_each_tasks_entropy_and_merges_with_them(tmp_path):
    """The merged weights are theta + sum_k clamp(lambda_k^l) tau_k^l with lambda from Adam
    (lr, betas 0.9/0.999, init) on sum_k mean entropy(head_k(f(x; theta(lambda)))) over task
    k's own inputs; the recorded coefficients are the ones the merged model uses. Wrong
    wirings (another lr, init or step count, task-wise coefficients, heads swapped, entropy
    ascended, no clamp) give other weights."""
    pre, taus, heads, inputs = setup(0)
    hp = {"steps": 6, "lr": 0.1, "init": 0.8, "batch_size": 16}
    with toy_pool(tmp_path, pre, taus, heads) as pool:
        merged = make_method("adamerging", hp).merge(pool, {t: {"x": x} for t, x in inputs.items()})
        order = list(pool.merged_keys)
    got = state_of(merged)
    expected, coefficients = adamerging_by_hand(pre, taus, heads, inputs, steps=6, lr=0.1, init=0.8)
    assert far(got, expected) < 1e-5
    table = merged.diagnostics()["coefficients_per_tensor"]
    for k, task in enumerate(TASKS):
        recorded = dict(zip(order, table[task]))
        assert [recorded[key] for key in KEYS] == pytest.approx(coefficients[k].tolist(), abs=1e-6)
    assert (coefficients == 1.0).any()  # the clamp binds somewhere
    assert (coefficients.max(1).values - coefficients.min(1).values > 1e-3).all()  # layer-wise
    assert merged.diagnostics()["entropy"]["last_step"] < merged.diagnostics()["entropy"]["first_step"]
    swapped = {"t1": "t2", "t2": "t3", "t3": "t1"}
    wrong = {
        "another lr": dict(lr=0.05), "another init": dict(init=0.3), "one step less": dict(steps=5),
        "task-wise coefficients": dict(per_tensor=False), "heads swapped": dict(heads_of=swapped),
        "entropy ascended": dict(ascend=True), "no clamp": dict(clamp=False),
    }
    for name, change in wrong.items():
        settings = dict(steps=6, lr=0.1, init=0.8) | change
        assert far(got, adamerging_by_hand(pre, taus, heads, inputs, **settings)[0]) > 1e-3, name


# --------------------------------------------------------------------------- Fisher


def fisher_by_hand(params, head, x, labels="expected"):
    """Diagonal Fisher 1/N sum_n sum_y p(y|x_n) (d log p(y|x_n) / d theta)^2 (or, as a wrong
    variant, the empirical Fisher at the predicted label)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for row in x:
        log_p = torch.log_softmax(mlp(leaves, row[None]) @ head.T, -1)[0]
        classes = range(len(log_p)) if labels == "expected" else [int(log_p.argmax())]
        for c in classes:
            grads = torch.autograd.grad(log_p[c], list(leaves.values()), retain_graph=True)
            weight = log_p[c].exp().detach() if labels == "expected" else 1.0
            for k, g in zip(leaves, grads):
                fisher[k] += weight * g**2
    return {k: v / len(x) for k, v in fisher.items()}


def fisher_merge_by_hand(pre, taus, heads, inputs, heads_of=None, inputs_of=None, model="finetuned",
                         normalize=True, labels="expected"):
    heads_of, inputs_of = heads_of or {t: t for t in TASKS}, inputs_of or {t: t for t in TASKS}
    numerator = {k: 0.0 for k in KEYS}
    denominator = {k: 0.0 for k in KEYS}
    for t in TASKS:
        theta = {k: pre[k] + taus[t][k] for k in KEYS}
        fisher = fisher_by_hand(theta if model == "finetuned" else pre, heads[heads_of[t]], inputs[inputs_of[t]],
                                labels)
        norm = torch.sqrt(sum((f**2).sum() for f in fisher.values())) if normalize else 1.0
        for k in KEYS:
            weight = fisher[k].clamp(min=1e-6) / norm
            numerator[k] = numerator[k] + weight * theta[k]
            denominator[k] = denominator[k] + weight
    return {k: numerator[k] / denominator[k] for k in KEYS}


def test_fisher_weights_each_model_by_its_own_fisher_on_its_own_task(tmp_path):
    """theta = sum_k F_k theta_k / sum_k F_k with F_k of fine-tuned model k, task k's inputs
    and head, exact expectation over the labels, normalised by ||F_k||; wrong wirings
    (another task's head or inputs, the pretrained model's Fisher, no normalisation, the
    empirical Fisher at the predicted label) give other weights."""
    pre, taus, heads, inputs = setup(1)
    with toy_pool(tmp_path, pre, taus, heads) as pool:
        got = state_of(make_method("fisher").merge(pool, {t: {"x": x} for t, x in inputs.items()}))
    assert far(got, fisher_merge_by_hand(pre, taus, heads, inputs)) < 1e-5
    rotate = {"t1": "t2", "t2": "t3", "t3": "t1"}
    wrong = {"another task's head": dict(heads_of=rotate), "another task's inputs": dict(inputs_of=rotate),
             "pretrained model's Fisher": dict(model="pretrained"), "not normalised": dict(normalize=False),
             "empirical Fisher": dict(labels="predicted")}
    for name, change in wrong.items():
        assert far(got, fisher_merge_by_hand(pre, taus, heads, inputs, **change)) > 1e-4, name


# --------------------------------------------------------------------------- RegMean


def regmean_by_hand(pre, taus, inputs, alpha=0.9, grams_under="finetuned", inputs_of=None):
    """Per linear layer W^T = (sum_k G~_k)^-1 sum_k G~_k W_k^T, G_k = X_k^T X_k / n of the layer's
    inputs in model k (l1: the inputs; l2: tanh(l1_k x)), G~ = alpha G + (1 - alpha) diag G;
    biases averaged."""
    inputs_of = inputs_of or {t: t for t in TASKS}
    sums = {name: [0.0, 0.0] for name in ("l1", "l2")}
    for t in TASKS:
        theta = {k: pre[k] + taus[t][k] for k in KEYS}
        source = theta if grams_under == "finetuned" else pre
        x = inputs[inputs_of[t]].double()
        layer_inputs = {"l1": x, "l2": torch.tanh(x @ source["l1.weight"].double().T + source["l1.bias"].double())}
        for name, rows in layer_inputs.items():
            gram = rows.T @ rows / len(rows)
            gram = alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram))
            sums[name][0] = sums[name][0] + gram
            sums[name][1] = sums[name][1] + gram @ theta[f"{name}.weight"].double().T
    merged = {f"{name}.weight": torch.linalg.solve(a, b).T.float() for name, (a, b) in sums.items()}
    for key in ("l1.bias", "l2.bias"):
        merged[key] = sum(pre[key] + taus[t][key] for t in TASKS) / len(TASKS)
    return merged


def test_regmean_solves_the_closed_form_with_grams_from_each_finetuned_model(tmp_path):
    """W = (sum G~_k)^-1 sum G~_k W_k per linear layer, with the second layer's Gram taken from
    its inputs in fine-tuned model k on task k's inputs; wrong wirings (Grams under the
    pretrained model, alpha ignored, another task's inputs, the plain mean) give other weights."""
    pre, taus, heads, inputs = setup(2, n=12)
    with toy_pool(tmp_path, pre, taus, heads) as pool:
        got = state_of(make_method("regmean").merge(pool, {t: {"x": x} for t, x in inputs.items()}))
    assert far(got, regmean_by_hand(pre, taus, inputs)) < 1e-5
    plain = {k: sum(pre[k] + taus[t][k] for t in TASKS) / len(TASKS) for k in KEYS}
    wrong = {"Grams under the pretrained model": regmean_by_hand(pre, taus, inputs, grams_under="pretrained"),
             "alpha ignored": regmean_by_hand(pre, taus, inputs, alpha=1.0),
             "another task's inputs": regmean_by_hand(pre, taus, inputs,
                                                      inputs_of={"t1": "t2", "t2": "t3", "t3": "t1"}),
             "plain mean": plain}
    for name, other in wrong.items():
        assert far(got, other) > 1e-4, name


# --------------------------------------------------------------------------- TIES


def ties_selected(taus, keep, per_tensor_trim=False, elect="sum"):
    """Per tensor, (K, ...) trimmed task vectors and where each agrees with the elected sign:
    each task vector trimmed to its top ``keep`` magnitudes over all its tensors (or, wrongly,
    per tensor), the sign elected as sign(sum) (or, wrongly, the majority of signs)."""
    trimmed = {}
    for t in TASKS:
        flat = torch.cat([taus[t][k].flatten() for k in KEYS]).abs()
        for k in KEYS:
            pool_of = taus[t][k].abs().flatten() if per_tensor_trim else flat
            # the authors' topk_values_mask: |tau| >= the (d - int(d keep))-th smallest magnitude
            kth = pool_of.sort().values[len(pool_of) - int(len(pool_of) * keep) - 1]
            trimmed.setdefault(k, []).append(taus[t][k] * (taus[t][k].abs() >= kth))
    out = {}
    for k in KEYS:
        stacked = torch.stack(trimmed[k])
        sign = torch.sign(stacked.sum(0)) if elect == "sum" else torch.sign(torch.sign(stacked).sum(0))
        out[k] = (stacked, stacked * sign > 0)
    return out


def ties_by_hand(taus, keep, merge_func, **wrong):
    """The disjoint mean or sum of the trimmed values that agree with the elected sign."""
    merged = {}
    for k, (stacked, agree) in ties_selected(taus, keep, **wrong).items():
        total = (stacked * agree).sum(0)
        merged[k] = total / agree.sum(0).clamp(min=1) if merge_func == "mean" else total
    return merged


@pytest.mark.parametrize("merge_func", ["mean", "sum"])
def test_ties_trims_over_the_whole_task_vector_and_elects_by_summed_values(tmp_path, merge_func):
    """theta = theta_pre + lambda * disjoint merge of the trimmed, sign-agreeing values, the trim
    threshold of each task taken over all its tensors at once (the authors' flattened
    ``topk_values_mask``); per-tensor trimming or a majority-of-signs election differ."""
    pre, taus, heads, _ = setup(3)
    with toy_pool(tmp_path, pre, taus, heads) as pool:
        merged = make_method("ties", {"keep": 0.3, "scaling": 0.4, "merge_func": merge_func}).merge(pool)
    got = state_of(merged)
    expected = {k: pre[k] + 0.4 * v for k, v in ties_by_hand(taus, 0.3, merge_func).items()}
    assert far(got, expected) < 1e-5
    for name, change in {"per-tensor trim": dict(per_tensor_trim=True), "sign majority": dict(elect="count")}.items():
        other = {k: pre[k] + 0.4 * v for k, v in ties_by_hand(taus, 0.3, merge_func, **change).items()}
        assert far(got, other) > 1e-3, name


def test_adamerging_plusplus_learns_its_coefficients_on_the_ties_selected_vectors(tmp_path):
    """AdaMerging++ (authors' ``main_layer_wise_adamergingpp.py``, dis-sum): the layer-wise
    coefficients are learned, and the model merged, on each task's trimmed entries that agree
    with the elected sign; learning on the plain task vectors or on per-tensor trims differs."""
    pre, taus, heads, inputs = setup(4)
    hp = {"steps": 4, "lr": 0.1, "init": 0.6, "batch_size": 16, "keep": 0.4, "merge_func": "sum"}
    with toy_pool(tmp_path, pre, taus, heads) as pool:
        got = state_of(make_method("adamerging++", hp).merge(pool, {t: {"x": x} for t, x in inputs.items()}))

    def selected(**wrong):
        chosen = ties_selected(taus, 0.4, **wrong)
        return {t: {k: chosen[k][0][i] * chosen[k][1][i] for k in KEYS} for i, t in enumerate(TASKS)}

    expected, _ = adamerging_by_hand(pre, selected(), heads, inputs, steps=4, lr=0.1, init=0.6)
    assert far(got, expected) < 1e-5
    for name, vectors in {"plain task vectors": taus, "per-tensor trim": selected(per_tensor_trim=True)}.items():
        other, _ = adamerging_by_hand(pre, vectors, heads, inputs, steps=4, lr=0.1, init=0.6)
        assert far(got, other) > 1e-3, name
