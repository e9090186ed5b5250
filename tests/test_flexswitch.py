"""FlexSwitch / Auto-FlexSwitch against the Auto-FlexSwitch equations (6-19) on
hand-sized cases, and end to end on the tiny-bert suite."""
from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergebench.codecs import choose_group_size, dequantize, quantize, sass_bits_exact
from mergebench.container import decode_tensors, encode_tensors, read_artifact
from mergebench.errors import CorruptArtifactError
from mergebench.exemplars import draw_exemplars
from mergebench.hyperparameters import resolve
from mergebench.methods.flexswitch import (
    FLEXSWITCH_HPARAMS,
    FlexSwitchSettings,
    TensorGate,
    cka_loss,
    decode_router,
    kl_loss,
    learn_metric,
    metric_loss,
    mse_loss,
    phi,
    train_flexswitch,
)
from mergebench.pool import ModelPool
from mergebench.runner import make_method, run

TAU = torch.tensor([0.5, -0.2, 0.1, -0.8, 0.05, 0.3, -0.05, 0.0])


def settings(**overrides) -> FlexSwitchSettings:
    return FlexSwitchSettings.from_hparams(resolve(FLEXSWITCH_HPARAMS, overrides, "flexswitch"))


def test_phi_maps_the_real_line_into_the_unit_interval():
    x = torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6])
    y = phi(x)
    assert y[2] == 0.5 and torch.all((y >= 0) & (y <= 1)) and torch.all(y[1:] > y[:-1])
    assert float(phi(torch.tensor(1.0))) == pytest.approx(0.75)  # arctan(1)/pi + 0.5


def test_thresholds_follow_eq6_inside_each_signs_range():
    gate = TensorGate(TAU, (1, 2, 4, 8))
    # positives 0.05..0.5, negative magnitudes 0.05..0.8
    assert (gate.pos.v_min, gate.pos.v_max) == pytest.approx((0.05, 0.5))
    assert (gate.neg.v_min, gate.neg.v_max) == pytest.approx((0.05, 0.8))
    with torch.no_grad():
        gate.s_pos.fill_(1.0)
        gate.s_neg.fill_(-1e9)
    t_pos, t_neg = gate.thresholds()
    assert float(t_pos.detach()) == pytest.approx(0.05 + 0.75 * 0.45)
    assert float(t_neg.detach()) == pytest.approx(0.05, abs=1e-9)


def test_gate_is_eq7_and_hardens_to_the_threshold_mask():
    gate = TensorGate(TAU, (1,))
    t_pos, t_neg = (float(t.detach()) for t in gate.thresholds())  # s = 0: mid-range
    rho = 0.3
    expected = torch.sigmoid((TAU - t_pos) / (rho * 0.45)) + torch.sigmoid((-t_neg - TAU) / (rho * 0.75))
    torch.testing.assert_close(gate.gate(rho), expected)
    mask, bits, scale = gate.hard(1e-4)
    assert mask.tolist() == ((TAU > t_pos) | (TAU < -t_neg)).tolist() == [True, False, False, True, False, True,
                                                                           False, False]
    assert bits == 1 and scale == pytest.approx(1.0)  # softplus(kappa) starts at 1


def test_soft_task_vector_mixes_the_eq13_quantisers_by_softmax_eq12():
    gate = TensorGate(TAU, (1, 2, 4, 8))
    with torch.no_grad():
        gate.w.copy_(torch.tensor([0.0, 1.0, 2.0, 0.5]))
        gate.kappa.fill_(0.3)
    omega, rho = 0.7, 0.5
    delta, mass = gate.soft(rho, omega)
    mask = gate.gate(rho)
    weights = torch.softmax(gate.w / omega, 0)
    levels = [torch.from_numpy(dequantize(*quantize(TAU.numpy(), b, bounds=(0.8, 0.5)))) for b in (1, 2, 4, 8)]
    mixed = sum(p * q for p, q in zip(weights, levels))
    torch.testing.assert_close(delta, F.softplus(torch.tensor(0.3)) * mask * mixed)
    torch.testing.assert_close(mass, mask.sum())
    assert float(gate.mixed_bits(omega)) == pytest.approx(float((weights * torch.tensor([1.0, 2, 4, 8])).sum()))
    assert gate.hard(rho)[1] == 4  # argmax w (Eq. 15)


@pytest.mark.parametrize("tau", [TAU, torch.tensor([0.0, 0.2, 0.4, 0.1])])
def test_fused_gate_gradients_equal_autograd_of_the_plain_expression(tau):
    gate = TensorGate(tau, (1, 2, 4, 8))
    with torch.no_grad():
        gate.w.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        gate.s_pos.fill_(0.4)
        gate.s_neg.fill_(-0.3)
    rho, omega = 0.6, 0.8
    outer = torch.linspace(-1, 1, tau.numel())  # any downstream use of delta, plus the mass term

    def objective(delta, mass):
        return (outer * delta).sum() + 0.7 * mass

    grads = torch.autograd.grad(objective(*gate.soft(rho, omega)), list(gate.parameters()), allow_unused=True)
    plain_delta = F.softplus(gate.kappa) * gate.gate(rho) * torch.einsum("b,b...->...", gate.mix(omega), gate.levels)
    expected = torch.autograd.grad(objective(plain_delta, gate.gate(rho).sum()), list(gate.parameters()),
                                   allow_unused=True)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got if got is not None else torch.zeros(()),
                                   want if want is not None else torch.zeros(()), rtol=1e-5, atol=1e-6)


def test_a_side_without_entries_has_no_gate_term():
    gate = TensorGate(torch.tensor([0.0, 0.2, 0.4]), (1,))
    assert not gate.neg.present
    assert gate.hard(1e-4)[0].tolist() == [False, False, True]


def test_kl_loss_is_eq9():
    teacher, student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]), torch.tensor([[0.5, 2.5, 0.0], [1.0, 0.0, 1.0]])
    q, p = torch.softmax(teacher / 4, -1), torch.softmax(student / 4, -1)
    expected = 16 / 2 * (q * (q / p).log()).sum()
    assert float(kl_loss(student, teacher)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def test_mse_loss_is_eq10():
    teacher, student = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert float(mse_loss(student, teacher)) == pytest.approx((5 + 25) / 2)


def test_cka_loss_is_eq11_and_ignores_scale_and_shift():
    generator = torch.Generator().manual_seed(0)
    f, g = torch.randn(16, 5, generator=generator), torch.randn(16, 5, generator=generator)
    h = torch.eye(16) - torch.ones(16, 16) / 16
    expected = 1 - (f.T @ h @ g).norm() ** 2 / ((f.T @ h @ f).norm() * (g.T @ h @ g).norm())
    assert float(cka_loss(g, f)) == pytest.approx(float(expected), rel=1e-5)
    assert float(cka_loss(3 * f + 2, f)) == pytest.approx(0.0, abs=1e-6)


def test_settings_check_names_and_resolve_the_loss_default_lambda():
    with pytest.raises(ValueError, match="kl, mse, cka"):
        settings(loss="l1")
    with pytest.raises(ValueError, match="bit_widths"):
        settings(bit_widths=[3])
    assert settings(loss="cka").lam == 10.0 and settings(loss="kl", **{"lambda": 0.2}).lam == 0.2
    s = settings(rho=1.0, decay=0.9, decay_every=10)
    assert s.temperatures(9) == (1.0, 1.0) and s.temperatures(25)[0] == pytest.approx(0.81)


def _train(tiny_bert, lam, steps=12):
    tasks = [t.name for t in tiny_bert.tasks]
    exemplars = draw_exemplars(tiny_bert, tasks[:1], 16, 0)[tasks[0]]
    with ModelPool(tiny_bert, tasks) as pool:
        encoder = tiny_bert.build_encoder().eval().requires_grad_(False)
        encoder.load_state_dict(pool.pretrained_state())
        config = settings(steps=steps, batch_size=8, decay_every=1, **{"lambda": lam})
        trained = train_flexswitch(pool, tasks[0], exemplars, config, 0, encoder)
        taus = {key: pool.task_vector(tasks[0], key) for key in trained.tensors}
    return trained, taus


def test_sparsity_and_bit_terms_win_when_preservation_is_off(tiny_bert):
    free, _ = _train(tiny_bert, 0.0)
    held, _ = _train(tiny_bert, 1e4)
    sparsity = lambda t: 1 - sum(c.n_kept for c in t.tensors.values()) / sum(c.n for c in t.tensors.values())  # noqa: E731
    assert sparsity(free) > sparsity(held)
    assert sparsity(free) > 0.5
    assert {c.bits for c in free.tensors.values()} == {1}  # the bit-width term alone pushes every tensor to 1 bit


def test_stored_switch_is_scale_times_hard_mask_times_quantised_tau(tiny_bert):
    trained, taus = _train(tiny_bert, 1.0, steps=6)
    decoded = decode_tensors(encode_tensors(trained.tensors))
    for key, tensor in decoded.items():
        tau = taus[key].flatten().numpy()
        assert tensor.fmt == "sass"
        levels = dequantize(*quantize(tau, tensor.bits, bounds=(max(0.0, -tau.min()), max(0.0, tau.max()))))
        expected = np.where(tensor.mask, np.float32(tensor.params["scale"]) * levels, 0.0)
        np.testing.assert_allclose(tensor.to_numpy().ravel(), expected, rtol=1e-6, atol=1e-9)
        # the SASS payload has exactly Eq. 16's size at the tensor's own sparsity
        assert tensor.payload_bits == sass_bits_exact(tensor.n, tensor.n_kept, tensor.bits,
                                                      choose_group_size(tensor.n, tensor.sparsity))


def test_metric_loss_is_eq19_on_a_hand_case():
    projection = torch.eye(2)
    features = torch.tensor([[0.0, 0.0]])
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    owners = torch.tensor([0, 1, 0])
    # two nearest centres: d = 1 (own task), 2 (other task)
    loss = metric_loss(projection, features, torch.tensor([0]), centres, owners, neighbours=2)
    assert float(loss) == pytest.approx(-math.log(1.0 / (1.0 + 0.5)))


def test_learned_metric_separates_tasks_that_differ_in_one_dimension():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    features = torch.randn(200, 32, generator=generator)
    features[:, 5] += 1.5 * (labels * 2.0 - 1.0)  # the only task signal, in one of 32 dimensions
    centres = torch.stack([features[labels == k][i::5].mean(0) for k in (0, 1) for i in range(5)])
    owners = torch.tensor([0] * 5 + [1] * 5)

    def knn_accuracy(projection):
        nearest = torch.cdist(features @ projection.T, centres @ projection.T).topk(3, largest=False).indices
        return float(((owners[nearest].float().mean(1) > 0.5).long() == labels).float().mean())

    projection, history = learn_metric(features, labels, centres, owners, rank=4, neighbours=3, lr=0.5, epochs=100,
                                       seed=0)
    initial = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(0))).Q.T
    assert projection.shape == (4, 32)
    assert history[-1] < 0.25 * history[0]
    assert knn_accuracy(projection) >= 0.95 > knn_accuracy(initial)


def test_flexswitch_and_auto_flexswitch_run_end_to_end(tiny_bert, tmp_path):
    hp = {"steps": 4, "exemplars": 16, "batch_size": 8}
    flex = run("flexswitch", "tiny-bert", hyperparameters=hp, results_dir=tmp_path)
    assert flex.hyperparameters["lambda"] == 1.0  # the record names the lambda that was used
    training = flex.diagnostics["flexswitch"]
    assert set(training) == {t.name for t in tiny_bert.tasks}
    assert all(0.0 <= d["sparsity"] <= 1.0 and 1.0 <= d["mean_bits"] <= 8.0 for d in training.values())
    auto = run("auto-flexswitch", "tiny-bert", hyperparameters={**hp, "centres": 4, "rank": 4, "metric_epochs": 5},
               results_dir=tmp_path)
    assert 0.0 <= auto.diagnostics["routing_accuracy_mean"] <= 1.0
    assert auto.extra_storage_bytes > flex.extra_storage_bytes  # the router (L and centres) is stored too
    assert auto.automatic and not flex.automatic


def test_flexswitch_needs_exemplars(tiny_bert):
    with ModelPool(tiny_bert, [t.name for t in tiny_bert.tasks]) as pool:
        with pytest.raises(ValueError, match="exemplars"):
            make_method("flexswitch").merge(pool, None)


def test_a_second_run_reuses_the_trained_switches(tiny_bert, tmp_path, mergebench_cache):
    hp = {"steps": 3, "exemplars": 8, "batch_size": 4}  # settings no other test uses: the first run trains
    first = run("flexswitch", "tiny-bert", hyperparameters=hp, results_dir=None)
    second = run("flexswitch", "tiny-bert", hyperparameters=hp, results_dir=None)
    assert not any(d["reused"] for d in first.diagnostics["flexswitch"].values())
    assert all(d["reused"] for d in second.diagnostics["flexswitch"].values())
    assert second.metrics == first.metrics and second.extra_storage_bytes == first.extra_storage_bytes
    assert second.diagnostics["flexswitch"] == {task: {**d, "reused": True} for task, d in first.diagnostics["flexswitch"].items()}
    fresh = run("flexswitch", "tiny-bert", hyperparameters={**hp, "reuse_training": False}, results_dir=None)
    assert not any(d["reused"] for d in fresh.diagnostics["flexswitch"].values())


def test_one_cache_file_per_training_with_its_cost_and_corrupt_entries_are_retrained(tiny_bert, mergebench_cache):
    hp = {"steps": 2, "exemplars": 8, "batch_size": 4, "decay_every": 3}  # settings no other test uses
    tasks = [t.name for t in tiny_bert.tasks]
    exemplars = draw_exemplars(tiny_bert, tasks, 8, 0)
    cache = mergebench_cache / "flexswitch"
    with ModelPool(tiny_bert, tasks) as pool:
        before = set(cache.glob("*"))
        first = make_method("flexswitch", hp).merge(pool, exemplars)
        entries = {path.stem.rsplit("-", 1)[0]: path for path in set(cache.glob("*")) - before}
        assert first.reused_training_seconds is None
        # one container per task (switches + training record), no sidecar; stored artifacts carry no record
        assert sorted(entries) == sorted(tasks)
        assert all(path.suffix == ".mbc" for path in entries.values())
        seconds = {}
        for task in tasks:
            contents = read_artifact(entries[task])
            assert contents.metadata["seconds"] > 0 and set(contents) == set(decode_tensors(first.artifacts()[f"{task}.sass"]))
            assert decode_tensors(first.artifacts()[f"{task}.sass"]).metadata == {}
            seconds[task] = contents.metadata["seconds"]

        second = make_method("flexswitch", hp).merge(pool, exemplars)
        assert all(d["reused"] for d in second.diagnostics()["flexswitch"].values())
        assert second.reused_training_seconds == pytest.approx(sum(seconds.values()), rel=1e-12)
        assert second.artifacts() == first.artifacts()

        truncated, flipped = (entries[task] for task in tasks[:2])
        truncated.write_bytes(truncated.read_bytes()[:-3])
        damaged = bytearray(flipped.read_bytes())
        damaged[30] ^= 0x04  # inside the header, which holds the training record
        flipped.write_bytes(bytes(damaged))
        for path, reason in ((truncated, "truncated"), (flipped, "header checksum mismatch")):
            with pytest.raises(CorruptArtifactError, match=re.escape(str(path)) + ".*" + reason):
                read_artifact(path)
        with pytest.warns(UserWarning) as caught:
            third = make_method("flexswitch", hp).merge(pool, exemplars)
        messages = [str(w.message) for w in caught]
        for path in (truncated, flipped):
            assert any(str(path) in m and "corrupt" in m for m in messages), messages
        assert [third.diagnostics()["flexswitch"][t]["reused"] for t in tasks] == [False, False, True]
        assert third.reused_training_seconds == pytest.approx(seconds[tasks[2]])
        assert third.artifacts() == first.artifacts()  # retrained with the same seed
        for path in (truncated, flipped):  # rewritten whole
            assert read_artifact(path).metadata["key"] in path.name


def test_auto_flexswitch_reuses_flexswitch_training_and_stores_a_checked_router(tiny_bert):
    hp = {"steps": 2, "exemplars": 8, "batch_size": 4, "decay": 0.8}  # settings no other test uses
    tasks = [t.name for t in tiny_bert.tasks]
    exemplars = draw_exemplars(tiny_bert, tasks, 8, 0)
    with ModelPool(tiny_bert, tasks) as pool:
        flex = make_method("flexswitch", hp).merge(pool, exemplars)
        auto = make_method("auto-flexswitch", {**hp, "centres": 2, "rank": 2, "metric_epochs": 2, "neighbours": 3}
                           ).merge(pool, exemplars)
    assert flex.reused_training_seconds is None
    assert auto.reused_training_seconds == pytest.approx(sum(d["seconds"] for d in flex.diagnostics()["flexswitch"].values()), abs=0.02)
    stored = auto.artifacts()["router.mbc"]
    projection, centres, owners, neighbours = decode_router(stored, tasks)
    assert projection.shape[0] == 2 and centres.shape == (2 * len(tasks), 2) and neighbours == 3
    assert torch.equal(auto.router.queries, centres) and torch.equal(auto.router.owners, owners)
    assert decode_tensors(stored).metadata == {"content": "auto-flexswitch/router", "tasks": tasks, "neighbours": 3}
    damaged = bytearray(stored)
    _, _, hlen, _ = struct.unpack_from("<8sIII", stored)
    damaged[20 + hlen] ^= 0x01  # the first payload: the projection L
    with pytest.raises(CorruptArtifactError, match=r"router\.mbc: tensor 'projection': payload checksum mismatch"):
        decode_router(bytes(damaged), tasks)
    with pytest.raises(CorruptArtifactError, match=r"router\.mbc: built for tasks"):
        decode_router(stored, tasks[:2])
