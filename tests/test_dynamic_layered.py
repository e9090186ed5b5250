"""Mixed routing weights run as one layered forward (each composed module runs each group's
slice under the group's tensors) and give, for every input, the forward under its own
theta(x) = theta_pre + sum_k w_k tau_hat_k, written out here per input with dense task
vectors; the layered path falls back to one forward per group where a module never runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergebench.container import decode_tensors
from mergebench.dynamic import ComposedMerged, TaskVectorStore
from mergebench.method import load_encoder
from mergebench.pool import ModelPool
from mergebench.switches import SwitchStore
from mergebench.methods.t_switch import encode_switches

WEIGHTS = [[1.0, 0.0, 0.0]] * 5 + [[0.0, 1.0, 0.0]] * 2 + [[0.3, 0.7, 0.0], [0.2, 0.2, 0.6], [0.3, 0.7, 0.0],
                                                            [0.0, 0.0, 1.0], [0.5, 0.0, 0.5]]


def dense_switches(artifacts: dict[str, bytes], tasks: list[str], shapes: dict[str, torch.Size]) -> list[dict]:
    """tau_hat_k of every tensor as a dense float32 tensor, decoded entry by entry from the codec."""
    out = []
    for task in tasks:
        contents = decode_tensors(artifacts[f"{task}.tswitch"], source=task)
        dense = {}
        for key, shape in shapes.items():
            values = np.zeros(int(np.prod(shape)), dtype=np.float32)
            if key in contents:
                compressed = contents.compressed(key)
                values[np.flatnonzero(compressed.mask)] = compressed.values()
            dense[key] = torch.from_numpy(values).view(shape)
        out.append(dense)
    return out


def per_input_reference(encoder, pretrained, taus, inputs, weights):
    """Each input alone through the encoder under its own theta_pre + sum_k w_k tau_hat_k."""
    rows = []
    for i, w in enumerate(weights):
        params = {key: base + sum(float(w[k]) * tau[key] for k, tau in enumerate(taus)) for key, base in pretrained.items()}
        one = {name: value[i:i + 1] for name, value in inputs.items()}
        rows.append(functional_call(encoder, params, args=(), kwargs=one))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def switched(tiny_bert):
    with ModelPool(tiny_bert, [t.name for t in tiny_bert.tasks]) as pool:
        artifacts = encode_switches(pool, alpha=0.5)
        encoder = load_encoder(pool.backbone, pool.pretrained_state())
        yield pool, artifacts, encoder


def test_mixed_weights_run_one_layered_forward_equal_to_each_inputs_own_weights(tiny_bert, switched):
    pool, artifacts, encoder = switched
    store = SwitchStore(pool.tasks, artifacts)
    merged = ComposedMerged(tiny_bert, encoder, store)
    weights = torch.tensor(WEIGHTS)
    task = tiny_bert.tasks[0]
    inputs, _ = next(iter(task.batches("test", len(weights))))
    assert len(inputs["input_ids"]) == len(weights)
    shapes = {key: merged.pretrained[key].shape for key in store.keys()}
    taus = dense_switches(artifacts, pool.tasks, shapes)
    with torch.no_grad():
        expected = per_input_reference(encoder, merged.pretrained, taus, inputs, weights)
        got = merged.features(inputs, weights)
        head = merged.head(task.name)
        assert torch.equal(head(got).argmax(-1), head(expected).argmax(-1))
    assert merged.layered_forwards == 1
    assert merged.materialisations == 1  # only the group of five (>= keep_min_inputs) got a whole, kept set
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(scale))
    # a wrong wiring (every input under the first group's weights) is far off
    assert not torch.allclose(got, per_input_reference(encoder, merged.pretrained, taus, inputs,
                                                       weights[:1].expand_as(weights)), atol=1e-3 * float(scale))
    # the grouped path (one forward per group) agrees
    unique, inverse = torch.unique(weights, dim=0, return_inverse=True)
    torch.testing.assert_close(merged._grouped(inputs, unique, inverse), got, rtol=0, atol=1e-5 * float(scale))
    # every Linear weight built per group, or every small group corrected from its dominant task's weights
    for build_rows in (0, 10**9):
        merged.build_rows = build_rows
        merged.clear_cache()
        corrected = merged.corrected_inputs
        with torch.no_grad():
            other = merged.features(inputs, weights)
        assert (merged.corrected_inputs > corrected) == (build_rows > 0)
        with torch.no_grad():
            assert torch.equal(head(other).argmax(-1), head(expected).argmax(-1))
        torch.testing.assert_close(other, expected, rtol=0, atol=1e-5 * float(scale))


def test_combine_into_writes_the_composed_tensor_bit_for_bit(switched):
    pool, artifacts, encoder = switched
    store = SwitchStore(pool.tasks, artifacts)
    state = encoder.state_dict()
    keys = store.keys()
    shapes = {key: state[key].shape for key in keys}
    taus = dense_switches(artifacts, pool.tasks, shapes)
    weights = torch.tensor([0.3, 0.0, 0.7])
    for key in keys:
        out = torch.full_like(state[key], float("nan"))
        store.combine_into(key, weights, state[key], out)
        # float32 products, summed in task order, then added to the pretrained tensor
        expected = state[key].numpy() + (np.float32(0.3) * taus[0][key].numpy() + np.float32(0.7) * taus[2][key].numpy())
        assert torch.equal(out, torch.from_numpy(expected)), key


class DenseStore(TaskVectorStore):
    """Dense task vectors: combine is sum_k w_k tau_k."""

    def __init__(self, taus: list[dict[str, torch.Tensor]]):
        self.tasks = [f"t{k}" for k in range(len(taus))]
        self.taus = taus

    def keys(self):
        return sorted(self.taus[0])

    def combine(self, key, weights):
        return sum(float(w) * tau[key] for w, tau in zip(weights, self.taus))


class Small(nn.Module):
    """Token and position embeddings (the positions' ids shared by the batch, (1, N)), a
    LayerNorm, a Linear with and one without bias; ``tied`` reads the last Linear's weight
    directly instead of calling it, as a parent module sometimes does."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(11, 6), nn.Embedding(5, 6)
        self.norm = nn.LayerNorm(6)
        self.up, self.down = nn.Linear(6, 8), nn.Linear(8, 3, bias=False)
        self.tied = tied

    def forward(self, ids):
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1])[None])
        h = torch.relu(self.up(self.norm(h)))
        return (F.linear(h, self.down.weight) if self.tied else self.down(h)).mean(1)


@pytest.mark.parametrize("tied", [False, True])
def test_layered_forward_on_embeddings_norms_and_linears_and_its_fallback(tied):
    torch.manual_seed(0)
    encoder = Small(tied).eval()
    pretrained = {key: value.clone() for key, value in encoder.state_dict().items()}
    taus = [{key: 0.5 * torch.randn_like(value) for key, value in pretrained.items()} for _ in range(3)]
    merged = ComposedMerged(None, encoder, DenseStore(taus))
    weights = torch.tensor(WEIGHTS)
    inputs = {"ids": torch.randint(0, 11, (len(weights), 5))}
    with torch.no_grad():
        expected = per_input_reference(encoder, pretrained, taus, inputs, weights)
        got = merged.features(inputs, weights)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # tied: the Linear read directly never ran, so the batch was recomputed one forward per group
    assert merged.layered_forwards == (0 if tied else 1)
    assert (merged._plan is None) == tied
    assert not any("forward" in vars(module) for module in encoder.modules())  # every module restored
