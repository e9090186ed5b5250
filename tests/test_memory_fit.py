"""A method that cannot fit says so before it starts: the estimate follows the documented
formula from the checkpoint's tensor sizes, a small "available memory" refuses the run with a
one-line error naming the method and the sizes, before any merge and with nothing recorded."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mergebench.memory as memory
from mergebench.errors import InsufficientMemoryError
from mergebench.memory import check_fits, estimate_footprint
from mergebench.cli import main
from mergebench.runner import load_pool, make_method, run


@pytest.fixture(scope="module")
def pool(tiny_bert):
    with load_pool(tiny_bert, [task.name for task in tiny_bert.tasks]) as opened:
        yield opened


def sizes(tiny_bert, merged_keys):
    """M, T, L and the 2-D merged weights' shapes, from the tensors themselves."""
    state = load_file(str(tiny_bert.pretrained_checkpoint()))
    whole = sum(4 * value.numel() for value in state.values())
    merged = [4 * state[key].numel() for key in merged_keys]
    shapes = [tuple(state[key].shape) for key in merged_keys if state[key].dim() == 2]
    return whole, sum(merged), max(merged), shapes


def test_the_estimate_per_method_kind(tiny_bert, pool):
    m, t, largest, shapes = sizes(tiny_bert, pool.merged_keys)
    k = len(pool.tasks)
    assert estimate_footprint(make_method("task-arithmetic"), pool) == (2 * m + k * largest, m)
    assert estimate_footprint(make_method("fisher"), pool) == (2 * m + 4 * t, 2 * m)
    grams = sum(8 * (i * i + i * o) for o, i in shapes)
    assert estimate_footprint(make_method("regmean"), pool) == (m + t + grams, m)
    assert estimate_footprint(make_method("adamerging"), pool) == (2 * m, k * t + 2 * m + 2 * t)
    assert estimate_footprint(make_method("t-switch"), pool) == (m, m + 2 * t + k * t // 16)
    assert estimate_footprint(make_method("flexswitch"), pool) == (m, m + 6 * t + k * t // 16)


def test_too_little_memory_is_refused_with_the_sizes(pool):
    method = make_method("adamerging")
    host, device = estimate_footprint(method, pool)
    check_fits(method, pool, "cpu", available=(host + device, host + device))  # exactly enough: fits
    with pytest.raises(InsufficientMemoryError, match=r"method 'adamerging' on 'tiny-bert' with 3 tasks needs about "
                                                      r"[\d.]+ MiB of RAM for its weights, [\d.]+ MiB is available"):
        check_fits(method, pool, "cpu", available=(host + device - 1, host + device - 1))
    # on a GPU the device's share is compared with its free memory, the host's with the RAM
    check_fits(method, pool, torch.device("cuda"), available=(host, device))
    with pytest.raises(InsufficientMemoryError, match=r"needs about [\d.]+ MiB on cuda for its weights"):
        check_fits(method, pool, torch.device("cuda"), available=(10**12, device - 1))


def test_a_run_that_cannot_fit_stops_before_the_merge(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: (4096, 4096))

    def never(self, pool, exemplars=None):
        raise AssertionError("merged although it cannot fit")

    monkeypatch.setattr(type(make_method("ties")), "merge", never)
    with pytest.raises(InsufficientMemoryError, match=r"method 'ties' on 'tiny-bert' .* of RAM for its weights, "
                                                      r"0\.0 MiB is available; nothing was merged"):
        run("ties", "tiny-bert", results_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing recorded
    code = main(["run", "--method", "ties", "--backbone", "tiny-bert", "--results-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(error) == 1 and "needs about" in error[0] and not list(tmp_path.iterdir())
