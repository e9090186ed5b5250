"""FlexSwitch's training loop and Auto-FlexSwitch's inference path, pinned against a loop
written out in this file from the Auto-FlexSwitch paper (Eqs. 6-19, §III-C, §IV), on a
two-layer toy encoder whose every number is checkable.

Each test runs the method through its public entry point (``make_method(...).merge``) and
compares what it stores and what inference computes with the independent loop; each test
also checks that the same loop wired wrongly (swapped learning rates, another schedule,
another step count, the KL reversed, a term left out, L ignored, ...) gives a result the
method's is measurably far from, so the comparison has the power to catch that mistake.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergebench.container import decode_tensors
from mergebench.pool import ModelPool
from mergebench.runner import make_method
from tests._stub import StubBackbone, StubData

D_IN, HIDDEN, D_OUT, CLASSES = 4, 5, 4, 3
W_SET = (1, 2, 4, 8)


class MLPEncoder(nn.Module):
    """features = l2(tanh(l1(x)))."""

    def __init__(self, d_in: int = D_IN, hidden: int = HIDDEN, d_out: int = D_OUT):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, d_out)
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class LinearFeatureEncoder(nn.Module):
    """features = l(x): the pretrained identity makes features = inputs (routing tests)."""

    def __init__(self, dim: int):
        super().__init__()
        self.l = nn.Linear(dim, dim)
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        return self.l(x)


class HeadsData(StubData):
    """A fixed, bias-free linear head per task (different per task)."""

    def __init__(self, heads: dict[str, torch.Tensor]):
        self.heads = heads

    def head(self, task):
        weight = self.heads[task]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.data.copy_(weight)
        return head


class ToyBackbone(StubBackbone):
    def __init__(self, root, pretrained, finetuned, heads, build):
        super().__init__(root, pretrained, finetuned, HeadsData(heads))
        self._build = build

    def build_encoder(self):
        return self._build()


def mlp(params, x):
    """The toy encoder written out (the reference never runs the module)."""
    hidden = torch.tanh(x @ params["l1.weight"].T + params["l1.bias"])
    return hidden @ params["l2.weight"].T + params["l2.bias"]


def signed(tau: torch.Tensor) -> torch.Tensor:
    """tau with its first four entries of signs +, -, +, - (every tensor has two entries of each sign)."""
    flat = tau.flatten().clone()
    flat[:4] = (flat[:4].abs() + 0.05) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    return flat.view_as(tau)


def toy_mlp_setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"l1.weight": (HIDDEN, D_IN), "l1.bias": (HIDDEN,), "l2.weight": (D_OUT, HIDDEN), "l2.bias": (D_OUT,)}
    pre = {k: 0.6 * torch.randn(s, generator=g) for k, s in shapes.items()}
    taus = {t: {k: signed(0.4 * torch.randn(s, generator=g)) for k, s in shapes.items()} for t in ("t1", "t2")}
    heads = {t: torch.randn(CLASSES, D_OUT, generator=g) for t in ("t1", "t2")}
    exemplars = {t: {"x": 1.5 * torch.randn(12, D_IN, generator=g)} for t in ("t1", "t2")}
    return pre, taus, heads, exemplars


# --------------------------------------------------------------------------- the reference loop


def eq13(tau: torch.Tensor, b: int) -> torch.Tensor:
    """Q(tau; b) of Eq. 13 over the range of the whole tensor [-v_max^-, v_max^+], with the
    bin index in its 1-based form ceil(.) (the documented reading of the printed floor)."""
    v_neg, v_pos = float(-tau.min()), float(tau.max())
    delta = (v_pos + v_neg) / 2**b
    index = torch.clamp(torch.ceil((tau.double() + v_neg) / delta), 1, 2**b) - 1
    return (-v_neg + (index + 0.5) * delta).float()


def kl_eq9(student, teacher, temperature=4.0):
    q = torch.softmax(teacher / temperature, -1)
    log_q, log_p = torch.log_softmax(teacher / temperature, -1), torch.log_softmax(student / temperature, -1)
    return temperature**2 / len(q) * (q * (log_q - log_p)).sum()


def mse_eq10(student, teacher):
    return ((teacher - student) ** 2).sum() / len(teacher)


def cka_eq11(student, teacher):
    b = len(teacher)
    h = torch.eye(b) - torch.ones(b, b) / b
    return 1 - (teacher.T @ h @ student).norm() ** 2 / ((teacher.T @ h @ teacher).norm() * (student.T @ h @ student).norm())


LOSS = {"kl": kl_eq9, "mse": mse_eq10, "cka": cka_eq11}


def reference_flexswitch(pre, tau, head, x, *, loss="kl", lam=1.0, steps=8, lr_lgs=0.05, lr_bas=0.1, rho=1.0,
                         omega=1.0, decay=0.9, decay_every=10, decay_omega=True, kl_reversed=False,
                         sparsity_term=True, bits_term=True):
    """Eq. 14 optimised by Adam (LGS params s+, s-, kappa at lr_lgs; BAS logits w at lr_bas)
    with rho, omega x decay every decay_every steps, on the whole exemplar batch; then Eq. 15
    and the hard mask. Returns per key (mask, bits, scale, stored tensor) and the last step's
    loss and preservation loss."""
    keys = sorted(tau)
    s_pos = {k: torch.zeros((), requires_grad=True) for k in keys}
    s_neg = {k: torch.zeros((), requires_grad=True) for k in keys}
    kappa = {k: torch.tensor(math.log(math.e - 1), requires_grad=True) for k in keys}
    w = {k: torch.zeros(len(W_SET), requires_grad=True) for k in keys}
    ranges = {}
    for k in keys:
        pos, neg = tau[k][tau[k] > 0], -tau[k][tau[k] < 0]
        ranges[k] = (float(pos.min()), float(pos.max() - pos.min()), float(neg.min()), float(neg.max() - neg.min()))
    levels = {k: torch.stack([eq13(tau[k], b) for b in W_SET]) for k in keys}
    optimizer = torch.optim.Adam([{"params": [*s_pos.values(), *s_neg.values(), *kappa.values()], "lr": lr_lgs},
                                  {"params": list(w.values()), "lr": lr_bas}])
    teacher = mlp({k: pre[k] + tau[k] for k in keys}, x) @ head.T
    preserve = LOSS[loss]
    total_n = sum(tau[k].numel() for k in keys)

    def gate(k, r):
        vp, rp, vn, rn = ranges[k]
        t_pos = vp + (torch.atan(s_pos[k]) / math.pi + 0.5) * rp  # Eq. 6
        t_neg = vn + (torch.atan(s_neg[k]) / math.pi + 0.5) * rn
        return torch.sigmoid((tau[k] - t_pos) / (r * rp)) + torch.sigmoid((-t_neg - tau[k]) / (r * rn))  # Eq. 7

    def temperatures(step):
        factor = decay ** (step // decay_every)
        return rho * factor, omega * (factor if decay_omega else 1.0)

    last = None
    for step in range(steps):
        r, o = temperatures(step)
        params, mass, mixed_bits = {}, 0.0, 0.0
        for k in keys:
            m = gate(k, r)
            p = torch.softmax(w[k] / o, 0)  # Eq. 12
            params[k] = pre[k] + F.softplus(kappa[k]) * m * torch.einsum("b,b...->...", p, levels[k])
            mass = mass + m.sum()
            mixed_bits = mixed_bits + (p * torch.tensor(W_SET, dtype=torch.float32)).sum()
        out = mlp(params, x) @ head.T
        pres = preserve(teacher, out) if kl_reversed else preserve(out, teacher)
        objective = lam * pres  # Eq. 14
        if sparsity_term:
            objective = objective + mass / total_n
        if bits_term:
            objective = objective + mixed_bits / (len(keys) * max(W_SET))
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        last = (float(objective.detach()), float(pres.detach()))
    r, _ = temperatures(steps - 1)
    stored = {}
    with torch.no_grad():
        for k in keys:
            mask = gate(k, r) > 0.5
            bits = W_SET[int(w[k].argmax())]  # Eq. 15
            scale = float(F.softplus(kappa[k]))
            stored[k] = (mask, bits, scale, torch.where(mask, scale * eq13(tau[k], bits), torch.zeros(())))
    return stored, last


def discrepancy(stored, last, decoded, record, free_scales=()) -> float:
    """How far a method's stored switches and training record are from a reference's: the
    largest of the scale, value and loss differences, plus 1 per mismatched mask entry or
    bit-width. ``free_scales``: keys whose scale the objective does not determine (not compared)."""
    worst = abs(record["final_loss"] - last[0]) + abs(record["final_preservation"] - last[1])
    for key, (mask, bits, scale, tensor) in stored.items():
        got = decoded[key]
        if key not in free_scales:
            worst = max(worst, abs(got.params["scale"] - scale),
                        float((got.to_dense().view(tensor.shape) - tensor).abs().max()))
        worst += float(np.count_nonzero(got.mask != mask.flatten().numpy())) + float(got.bits != bits)
    return worst


HP = {"steps": 8, "batch_size": 16, "rho": 0.8, "omega": 0.6, "decay": 0.7, "decay_every": 3, "lambda": 3.0,
      "reuse_training": False}
WRONG_WIRINGS = {
    "learning rates swapped": {"lr_lgs": 0.1, "lr_bas": 0.05},
    "one learning rate for all": {"lr_bas": 0.05},
    "temperatures never decayed": {"decay": 1.0},
    "decayed every step": {"decay_every": 1},
    "omega not decayed": {"decay_omega": False},
    "rho and omega swapped": {"rho": 0.6, "omega": 0.8},
    "one step less": {"steps": 7},
    "lambda ignored": {"lam": 1.0},
    "no sparsity term": {"sparsity_term": False},
    "no bit-width term": {"bits_term": False},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """FlexSwitch trained with each preservation loss on the toy pool, through merge()."""
    pre, taus, heads, exemplars = toy_mlp_setup()
    out = {}
    for loss in ("kl", "mse", "cka"):
        root = tmp_path_factory.mktemp(f"flex-{loss}")
        finetuned = {t: {k: pre[k] + taus[t][k] for k in pre} for t in taus}
        with ModelPool(ToyBackbone(root, pre, finetuned, heads, MLPEncoder)) as pool:
            merged = make_method("flexswitch", {**HP, "loss": loss}).merge(pool, exemplars)
        out[loss] = merged
    return pre, taus, heads, exemplars, out


def reference_for(pre, taus, heads, exemplars, task, loss, **wiring):
    settings = dict(loss=loss, lam=HP["lambda"], steps=HP["steps"], rho=HP["rho"], omega=HP["omega"],
                    decay=HP["decay"], decay_every=HP["decay_every"])
    settings.update(wiring)
    return reference_flexswitch(pre, taus[task], heads[task], exemplars[task]["x"], **settings)


@pytest.mark.parametrize("loss", ["kl", "mse", "cka"])
def test_training_loop_is_eq14_with_the_papers_schedule_and_param_groups(trained, loss):
    """The switches merge() stores equal the reference loop's: thresholds (Eq. 6-7), mixed
    bit-widths (Eqs. 12-13), Eq. 14 with each loss, Adam with lr_lgs on s+, s-, kappa and
    lr_bas on w, rho and omega x decay every decay_every steps, `steps` steps, then the hard
    mask M > 0.5, b = argmax w (Eq. 15) and softplus(kappa) as the stored scale."""
    pre, taus, heads, exemplars, merged = trained
    record = merged[loss].diagnostics()["flexswitch"]
    for task in ("t1", "t2"):
        decoded = dict(decode_tensors(merged[loss].artifacts()[f"{task}.sass"]).items())
        assert set(decoded) == set(pre)  # exactly the learned switches: one per changed tensor
        # CKA centres the outputs, so a shift of them (the last layer's bias times its scale)
        # has zero gradient: that scale moves by Adam's normalised step on rounding noise
        free = ("l2.bias",) if loss == "cka" else ()
        stored, last = reference_for(pre, taus, heads, exemplars, task, loss)
        assert discrepancy(stored, last, decoded, record[task], free) < 2e-4, task
        # the stored scale was learned (it moved from softplus(kappa_0) = 1)
        assert all(abs(d.params["scale"] - 1.0) > 1e-3 for d in decoded.values())
        if task != "t1":
            continue
        wrong = {name: discrepancy(*reference_for(pre, taus, heads, exemplars, task, loss, **wiring), decoded,
                                   record[task], free)
                 for name, wiring in WRONG_WIRINGS.items()}
        assert min(wrong.values()) > 5e-3, wrong


def test_kl_reads_the_finetuned_model_as_q(trained):
    """Eq. 9 is KL(q || p), q the fine-tuned model's probabilities: the reversed KL trains
    to another result."""
    pre, taus, heads, exemplars, merged = trained
    record = merged["kl"].diagnostics()["flexswitch"]["t1"]
    decoded = dict(decode_tensors(merged["kl"].artifacts()["t1.sass"]).items())
    reversed_ = reference_for(pre, taus, heads, exemplars, "t1", "kl", kl_reversed=True)
    assert discrepancy(*reversed_, decoded, record) > 5e-3


def test_inference_uses_the_stored_switch_of_the_known_task(trained):
    """FlexSwitch composes theta + tau~_k for task k, tau~_k = softplus(kappa) M_hard (.) Q(tau; b)
    exactly as stored; the predictions are those of that model, not of another task's switch."""
    pre, taus, heads, exemplars, merged = trained
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(7))
    model = merged["kl"]
    switches = {}
    for task in ("t1", "t2"):
        stored, _ = reference_for(pre, taus, heads, exemplars, task, "kl")
        switches[task] = {k: v[3] for k, v in stored.items()}
    for task, other in (("t1", "t2"), ("t2", "t1")):
        expected = mlp({k: pre[k] + switches[task][k] for k in pre}, x) @ heads[task].T
        wrong = mlp({k: pre[k] + switches[other][k] for k in pre}, x) @ heads[task].T
        got = model.predict(task, {"x": x})
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert (got - wrong).abs().max() > 1e-2


def test_preservation_loss_decreases_and_lambda_trades_it_against_sparsity(tmp_path):
    """With a strong lambda the preservation loss at the last step is below its value at the
    initial gates; with lambda = 0 only the sparsity and bit terms act, so the switches end
    sparser and at lower bit-widths than with a strong lambda."""
    pre, taus, heads, exemplars = toy_mlp_setup(1)
    finetuned = {t: {k: pre[k] + taus[t][k] for k in pre} for t in taus}
    results = {}
    with ModelPool(ToyBackbone(tmp_path, pre, finetuned, heads, MLPEncoder)) as pool:
        for lam in (0.0, 50.0):
            hp = {**HP, "steps": 30, "lambda": lam, "loss": "mse"}
            merged = make_method("flexswitch", hp).merge(pool, exemplars)
            results[lam] = merged
    # the preservation loss at the initial gates (s = 0, kappa: scale 1, w = 0), by hand
    x, tau, head = exemplars["t1"]["x"], taus["t1"], heads["t1"]
    initial = {}
    for k in pre:
        pos, neg = tau[k][tau[k] > 0], -tau[k][tau[k] < 0]
        t_pos, t_neg = pos.min() + 0.5 * (pos.max() - pos.min()), neg.min() + 0.5 * (neg.max() - neg.min())
        m = torch.sigmoid((tau[k] - t_pos) / (0.8 * (pos.max() - pos.min()))) + \
            torch.sigmoid((-t_neg - tau[k]) / (0.8 * (neg.max() - neg.min())))
        initial[k] = pre[k] + m * sum(eq13(tau[k], b) for b in W_SET) / 4
    start = mse_eq10(mlp(initial, x) @ head.T, mlp({k: pre[k] + tau[k] for k in pre}, x) @ head.T)
    strong = results[50.0].diagnostics()["flexswitch"]["t1"]
    assert strong["final_preservation"] < 0.5 * float(start)
    free = results[0.0].diagnostics()["flexswitch"]["t1"]
    assert free["sparsity"] > strong["sparsity"] and free["mean_bits"] <= strong["mean_bits"]


def test_documented_defaults_are_the_papers():
    """§III-C / §IV: N = 100, B = 32, 500 Adam steps, lr 0.05 (LGS) and 0.1 (BAS), rho = omega
    = 1 decayed x0.9 every 10 steps, W = {1, 2, 4, 8}; Auto-FlexSwitch r = 32, E = 20, C = 10,
    metric lr 0.5 for 100 epochs."""
    hp = make_method("auto-flexswitch").hparams
    assert (hp["exemplars"], hp["batch_size"], hp["steps"], hp["lr_lgs"], hp["lr_bas"]) == (100, 32, 500, 0.05, 0.1)
    assert (hp["rho"], hp["omega"], hp["decay"], hp["decay_every"], list(hp["bit_widths"])) == (1.0, 1.0, 0.9, 10,
                                                                                              [1, 2, 4, 8])
    assert (hp["rank"], hp["centres"], hp["neighbours"], hp["metric_lr"], hp["metric_epochs"]) == (32, 20, 10, 0.5, 100)


def test_stored_switch_holds_the_eq13_range_and_the_eq16_17_sass_layout(trained):
    """Each stored tensor keeps the quantiser range of its whole task vector (Eq. 13's
    v_max^-, v_max^+, not that of the kept entries), its group size is Eq. 17's divisor of n
    nearest ln 2 / (1 - alpha) (at most 256) at its own sparsity, and its payload is Eq. 16's
    35 + n/c + n_kept (ceil(log2 c) + b + 1) bits exactly."""
    pre, taus, heads, exemplars, merged = trained
    for task in ("t1", "t2"):
        for key, got in decode_tensors(merged["kl"].artifacts()[f"{task}.sass"]).items():
            tau = taus[task][key]
            assert got.params["v_neg"] == pytest.approx(float(-tau.min()), rel=1e-6)
            assert got.params["v_pos"] == pytest.approx(float(tau.max()), rel=1e-6)
            n, kept = tau.numel(), int(got.mask.sum())
            alpha = 1 - kept / n
            divisors = [c for c in range(1, min(n, 256) + 1) if n % c == 0]
            c = min(divisors, key=lambda c: (abs(math.log(2) / (1 - alpha) - c), c)) if kept else divisors[-1]
            assert got.group_size == c, (task, key)
            assert got.payload_bits == 35 + n // c + kept * (math.ceil(math.log2(c)) + got.bits + 1), (task, key)
