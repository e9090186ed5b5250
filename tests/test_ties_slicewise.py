"""TIES merged slice by slice gives, bit for bit, the whole-tensor TIES written here plainly:
thresholds by sorting the concatenated magnitudes, every tensor's K task vectors stacked,
trimmed, the sign of the trimmed sum elected (exact zero sums take the sign of the tensor's
sum of signs, + when that is 0) and the agreeing values summed or averaged. The slices are
made smaller than the tensors, and the values are multiples of 1/8 so that many magnitudes
equal the threshold and many trimmed sums are exactly zero."""
from __future__ import annotations

import pytest
import torch

import mergebench.merging as merging
from mergebench.runner import make_method
from tests._stub import make_pool, merged_state

SLICE = 64  # a multiple of 32, as merging.CHUNK must be; far below the tensors' sizes
SHAPES = {"one": (1,), "seven": (7,), "matrix": (5, 61), "long": (300,), "cube": (3, 4, 33), "majority": (300,)}


def states(num_tasks: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    pretrained = {key: torch.randint(-8, 9, shape, generator=generator).float() * 0.25
                  for key, shape in SHAPES.items()}
    pretrained["noise"] = torch.randn(4, 50, generator=generator)
    taus = []
    for _ in range(num_tasks):
        tau = {key: torch.randint(-3, 4, shape, generator=generator).float() * 0.125 for key, shape in SHAPES.items()}
        tau["noise"] = torch.randn(4, 50, generator=generator) * 10.0 ** torch.randint(-3, 1, (1,), generator=generator)
        taus.append(tau)
    # "majority": the first slice sums to +0.5 or to exactly 0 (task 0 + and task 1 -, the others 0),
    # the rest to -0.5, so its slice alone would elect + for its zero sums, the whole tensor elects -
    first = torch.arange(SLICE) % 2 == 0
    for k, tau in enumerate(taus):
        column = torch.zeros(300)
        if k == 0:
            column[:SLICE] = 0.5
        elif k == 1:
            column[:SLICE] = torch.where(first, -0.5, 0.0)
        if k == 0:
            column[SLICE:] = -0.5
        tau["majority"] = column
    finetuned = {f"t{k}": {key: pretrained[key] + tau[key] for key in pretrained} for k, tau in enumerate(taus)}
    return pretrained, finetuned


def plain_ties(pretrained: dict, finetuned: dict, keep: float, scaling: float, merge_func: str) -> dict:
    keys = sorted(pretrained)
    taus = {key: torch.stack([state[key] - pretrained[key] for state in finetuned.values()]) for key in keys}
    flat = torch.cat([taus[key].reshape(len(finetuned), -1) for key in keys], dim=1).abs()
    n = flat.shape[1]
    kth = min(max(n - int(n * keep), 1), n)
    thresholds = flat.sort(dim=1).values[:, kth - 1]
    out = {}
    for key in keys:
        stacked = taus[key]
        trimmed = stacked * (stacked.abs() >= thresholds.view(-1, *[1] * (stacked.dim() - 1)))
        sign = torch.sign(trimmed.sum(0))
        majority = torch.sign(sign.sum())
        sign[sign == 0] = majority if majority != 0 else 1.0
        agrees = torch.where(sign > 0, trimmed > 0, trimmed < 0)
        summed = (trimmed * agrees).sum(0)
        merged = summed if merge_func == "sum" else summed / agrees.sum(0).clamp(min=1)
        out[key] = pretrained[key] + scaling * merged
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("merge_func", ["mean", "sum"])
@pytest.mark.parametrize("num_tasks,keep", [(2, 0.2), (3, 0.5), (4, 1.0), (8, 0.2), (8, 0.03)])
def test_slicewise_ties_is_the_whole_tensor_ties_bit_for_bit(tmp_path, monkeypatch, num_tasks, keep, merge_func):
    monkeypatch.setattr(merging, "CHUNK", SLICE)
    pretrained, finetuned = states(num_tasks, seed=num_tasks * 10 + int(keep * 100))
    expected = plain_ties(pretrained, finetuned, keep, 0.3, merge_func)
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        state = merged_state(make_method("ties", {"keep": keep, "scaling": 0.3, "merge_func": merge_func}).merge(pool))
    for key, value in expected.items():
        assert state[key].shape == value.shape
        assert torch.equal(bits(state[key]), bits(value)), key


def test_the_fixture_has_ties_at_the_threshold_zero_sums_and_a_tensor_wide_majority():
    """What the bit-for-bit test relies on: entries equal to a threshold, exact zero sums with
    non-zero trimmed values (where the majority decides), and a first slice whose own majority
    is + while its tensor's is -."""
    pretrained, finetuned = states(3, seed=35)
    taus = {key: torch.stack([s[key] - pretrained[key] for s in finetuned.values()]) for key in pretrained}
    magnitudes = torch.cat([t.reshape(3, -1) for t in taus.values()], dim=1).abs()
    kth = magnitudes.shape[1] - int(magnitudes.shape[1] * 0.5)
    threshold = magnitudes.sort(dim=1).values[:, kth - 1]
    assert ((magnitudes == threshold[:, None]).sum(1) > 1).all()
    stacked = taus["long"]
    assert ((stacked.sum(0) == 0) & (stacked != 0).any(0)).any()
    sums = taus["majority"].sum(0)
    assert (sums[:SLICE] >= 0).all() and (sums[:SLICE] > 0).any() and (sums[:SLICE] == 0).any()
    assert int(torch.sign(sums).sum()) < 0
    # the majority matters: dis-sum there is -0.5 (the - task), not +0.5 (the + task)
    with_majority = plain_ties(pretrained, finetuned, 1.0, 1.0, "sum")["majority"] - pretrained["majority"]
    zero = (sums == 0).nonzero().squeeze(1)
    assert torch.equal(with_majority[zero], torch.full((len(zero),), -0.5))


def test_slicewise_ties_at_the_real_slice_length(tmp_path):
    """Tensors longer than merging.CHUNK, with continuous values (rounding order matters)."""
    generator = torch.Generator().manual_seed(3)
    pretrained = {"w": torch.randn(2, merging.CHUNK + 77, generator=generator), "b": torch.randn(33, generator=generator)}
    finetuned = {f"t{k}": {key: value + torch.randn(value.shape, generator=generator) * 1e-2
                           for key, value in pretrained.items()} for k in range(5)}
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        for merge_func in ("mean", "sum"):
            state = merged_state(make_method("ties", {"keep": 0.2, "merge_func": merge_func}).merge(pool))
            expected = plain_ties(pretrained, finetuned, 0.2, 0.3, merge_func)
            for key in pretrained:
                assert torch.equal(bits(state[key]), bits(expected[key])), (key, merge_func)


def test_merge_sliced_rejects_a_combine_that_gives_too_few_values(tmp_path):
    pretrained, finetuned = states(2, seed=1)
    with make_pool(tmp_path, pretrained, finetuned) as pool:
        with pytest.raises(RuntimeError, match="sliced merge gave"):
            merging.merge_sliced(pool, lambda slices: (taus[0, :-1] for taus in slices()))
