"""The fast paths of static merging give what the plain paths give, bit for bit:
slice-wise elementwise merges, the encoder built without initialisation, and TIES's
trim thresholds found by counting instead of sorting."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mergebench.merging import CHUNK, merge_elementwise, merge_task_vectors
from mergebench.method import StaticMerged
from mergebench.runner import make_method
from mergebench.sparsify import trim_thresholds
from tests._stub import make_pool

# sizes around the slice length and torch's 32-column blocks, and tiny ones
SHAPES = {"one": (1,), "seven": (7,), "odd": (CHUNK + 45,), "matrix": (3, 40_001), "aligned": (2, CHUNK)}


def random_states(num_tasks: int, seed: int, ties: bool = False):
    generator = torch.Generator().manual_seed(seed)
    pretrained = {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}
    finetuned = {}
    for k in range(num_tasks):
        state = {}
        for key, value in pretrained.items():
            if ties:  # few distinct magnitudes: many entries equal to the threshold
                tau = torch.randint(-3, 4, value.shape, generator=generator).float() * 0.125
            else:
                tau = torch.randn(value.shape, generator=generator) * 10.0 ** torch.randint(-4, 1, (1,), generator=generator)
            state[key] = value + tau
        finetuned[f"t{k}"] = state
    return pretrained, finetuned


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_elementwise_merges_match_the_whole_tensor_merge_bit_for_bit(tmp_path, num_tasks):
    pretrained, finetuned = random_states(num_tasks, seed=num_tasks)
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        for plain, sliced in [
            (lambda key, taus: torch.stack(taus).mean(0), lambda taus: taus.mean(0)),
            (lambda key, taus: 0.3 * torch.stack(taus).sum(0), lambda taus: 0.3 * taus.sum(0)),
        ]:
            reference = merge_task_vectors(pool, plain)
            fast = merge_elementwise(pool, sliced)
            assert reference.keys() == fast.keys()
            for key in pool.merged_keys:
                assert fast[key].shape == reference[key].shape
                assert torch.equal(bits(fast[key]), bits(reference[key])), key
            assert torch.equal(fast["count"], reference["count"])


def test_weight_averaging_and_task_arithmetic_are_the_formulas(tmp_path):
    pretrained, finetuned = random_states(3, seed=5)
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        averaged = make_method("weight-averaging").merge(pool).encoder.state_dict()
        arithmetic = make_method("task-arithmetic", {"scaling": 0.3}).merge(pool).encoder.state_dict()
    for key, value in pretrained.items():
        taus = [finetuned[t][key].double() - value.double() for t in finetuned]
        mean = sum(finetuned[t][key].double() for t in finetuned) / 3
        assert torch.allclose(averaged[key].double(), mean, rtol=0, atol=1e-5)
        assert torch.allclose(arithmetic[key].double(), value.double() + 0.3 * sum(taus), rtol=0, atol=1e-5)


class WithBuffers(nn.Module):
    """A module whose constructor initialises randomly and holds a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.register_buffer("steps", torch.arange(3), persistent=False)
        self.register_buffer("offset", torch.zeros(3))

    def forward(self, x):
        return (self.linear(x) + self.offset) * self.scale + self.steps


def test_encoder_holding_is_the_state_without_copies_and_keeps_unsaved_buffers(tmp_path):
    from tests._stub import StubBackbone

    class Backbone(StubBackbone):
        def build_encoder(self):
            return WithBuffers()

    backbone = Backbone(tmp_path, {"a": torch.zeros(1)}, {"t1": {"a": torch.ones(1)}})
    generator = torch.Generator().manual_seed(0)
    state = {"linear.weight": torch.randn(3, 5, generator=generator), "linear.bias": torch.randn(3, generator=generator),
             "scale": torch.randn(3, generator=generator), "offset": torch.randn(3, generator=generator)}
    encoder = backbone.encoder_holding(state)
    plain = WithBuffers()
    plain.load_state_dict(state)
    x = torch.randn(4, 5, generator=generator)
    assert not encoder.training
    assert torch.equal(encoder(x), plain.eval()(x))
    assert encoder.linear.weight.data_ptr() == state["linear.weight"].data_ptr()  # no copy
    assert torch.equal(encoder.steps, torch.arange(3))  # built as usual, not left on the meta device
    # a state of another dtype is cast to the module's, as load_state_dict would
    half = backbone.encoder_holding({key: value.double() for key, value in state.items()})
    assert half.linear.weight.dtype == torch.float32 and torch.equal(half.linear.weight, state["linear.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        backbone.encoder_holding({key: value for key, value in state.items() if key != "scale"})


def test_static_merge_of_tiny_bert_predicts_as_a_plainly_loaded_encoder(tiny_bert):
    from mergebench.pool import ModelPool

    with ModelPool(tiny_bert) as pool:
        merged = make_method("task-arithmetic").merge(pool)
        state = {key: value.detach().clone() for key, value in merged.encoder.state_dict().items()}
    plain = tiny_bert.build_encoder()
    plain.load_state_dict(state, strict=True)
    task = tiny_bert.tasks[0]
    inputs, _ = next(task.batches("test", 4))
    with torch.no_grad():
        assert torch.equal(merged.encoder(**inputs), plain.eval()(**inputs))
    assert isinstance(merged, StaticMerged)


def sorted_threshold(finetuned: dict, pretrained: dict, task: str, keep: float) -> float:
    """The k-th largest magnitude of the whole task vector, by sorting everything."""
    magnitudes = torch.cat([(finetuned[task][key] - pretrained[key]).abs().flatten().float() for key in sorted(pretrained)])
    n = magnitudes.numel()
    k = min(max(n - int(n * keep), 1), n)
    return float(magnitudes.sort().values[k - 1])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0, 1e-7, 0.9999])
def test_trim_thresholds_equal_the_sorted_reference(tmp_path, ties, keep):
    pretrained, finetuned = random_states(3, seed=11 if ties else 12, ties=ties)
    finetuned["t1"]["seven"] = pretrained["seven"].clone()  # an all-zero task vector tensor
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        thresholds = trim_thresholds(pool, keep)
    assert thresholds == [sorted_threshold(finetuned, pretrained, task, keep) for task in finetuned]


def test_trim_threshold_of_tiny_tensors_and_a_zero_task_vector(tmp_path):
    pretrained = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0])}
    finetuned = {"t1": {"a": torch.tensor([0.75, -1.5]), "b": torch.tensor([1.0])},  # |tau| = 0.25, 0.5, 1
                 "t2": {key: value.clone() for key, value in pretrained.items()}}
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        # k = n - int(n * keep) of n = 3: keep 0.2 -> the 3rd smallest, 1.0; keep 0.5 -> the 2nd, 0.5
        assert trim_thresholds(pool, 0.2) == [1.0, 0.0]
        assert trim_thresholds(pool, 0.5) == [0.5, 0.0]


# --- switch stores kept packed ----------------------------------------------------------------
def dense_switches(artifacts: dict, tasks: list[str], suffix: str) -> dict[str, torch.Tensor]:
    """The (K, ...) float32 stacks of the decoded switches, as the codec decodes them."""
    from mergebench.container import decode_tensors

    stacks: dict[str, torch.Tensor] = {}
    for k, task in enumerate(tasks):
        contents = decode_tensors(artifacts[task + suffix])
        for key in contents:
            dense = contents.compressed(key).to_dense()
            stacks.setdefault(key, torch.zeros(len(tasks), *dense.shape))[k] = dense
    return stacks


def dense_combine(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    active = weights.nonzero().squeeze(1)
    if len(active) == 1:
        return weights[active[0]] * stack[active[0]]
    return (weights @ stack.view(len(stack), -1)).view(stack.shape[1:])


WEIGHTS = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.0, 0.7, 0.2],
           [0.3, 0.3, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0], [1 / 3, 2 / 3, 0.0, 0.0]]


def test_packed_t_switches_compose_as_the_dense_stacks_bit_for_bit(tmp_path):
    from mergebench.methods.t_switch import encode_switches
    from mergebench.switches import SwitchStore

    pretrained, finetuned = random_states(4, seed=21)
    finetuned["t2"]["seven"] = pretrained["seven"].clone()  # unchanged: that task stores nothing for it
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        artifacts = encode_switches(pool, alpha=0.5)
        tasks = pool.tasks
    store = SwitchStore(tasks, artifacts)
    stacks = dense_switches(artifacts, tasks, ".tswitch")
    assert store.keys() == sorted(stacks)
    dense_bytes = sum(stack.numel() * 4 for stack in stacks.values())
    assert store.nbytes() < dense_bytes / 12  # 2 bits per entry instead of 32
    for weights in map(torch.tensor, WEIGHTS):
        for key, stack in stacks.items():
            assert torch.equal(store.combine(key, weights), dense_combine(stack, weights)), (key, weights)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8])
def test_packed_b_bit_switches_compose_as_the_dense_stacks_bit_for_bit(bits):
    from mergebench.codecs import quantized_from_task_vector
    from mergebench.container import encode_tensors
    from mergebench.switches import SwitchStore

    generator = torch.Generator().manual_seed(bits)
    tasks = ["t0", "t1", "t2", "t3"]
    artifacts = {}
    for task in tasks:
        tensors = {}
        for key, shape in {"w": (33, 17), "b": (5,), "big": (70_003,)}.items():
            tau = torch.randn(shape, generator=generator)
            mask = torch.rand(shape, generator=generator) < 0.4
            scale = float(torch.rand(1, generator=generator)) + 0.5
            tensors[key] = quantized_from_task_vector(tau, mask, bits, "sass", scale=scale)
        artifacts[task + ".sass"] = encode_tensors(tensors)
    store = SwitchStore(tasks, artifacts, ".sass")
    stacks = dense_switches(artifacts, tasks, ".sass")
    for weights in map(torch.tensor, WEIGHTS):
        for key, stack in stacks.items():
            assert torch.equal(store.combine(key, weights), dense_combine(stack, weights)), (key, weights)
