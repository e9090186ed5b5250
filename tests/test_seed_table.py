"""Seeds in the leaderboard: several seeds of one configuration are one row, mean ± sample
standard deviation with the number of seeds; a configuration with one seed prints as before."""
from __future__ import annotations

import pytest

from mergebench.results import append_result, to_frame
from mergebench.table import SeedMean, latest_per_configuration, leaderboard_markdown, mean_over_seeds, results_table
from tests.test_results import make_result, table_rows


def test_several_seeds_become_one_row_with_mean_spread_and_count():
    seeds = [make_result(seed=seed, average=value, merge_seconds=seconds)
             for seed, value, seconds in ((0, 0.5, 1.0), (1, 0.6, 2.0), (2, 0.7, 3.0))]
    other_scaling = make_result(seed=0, average=0.4, hyperparameters={"scaling": 0.5})
    (mean, single) = mean_over_seeds([*seeds, other_scaling])
    assert isinstance(mean, SeedMean) and mean.seeds == (0, 1, 2) and single is other_scaling
    assert mean.average == pytest.approx(0.6) and mean.average_std == pytest.approx(0.1)
    assert mean.metrics == pytest.approx({"markers-a": 0.6, "markers-b": 0.6}) and mean.merge_seconds == pytest.approx(2.0)
    header, row, _ = table_rows(results_table([mean, single]))
    cells = dict(zip(header, row))
    assert cells["markers-a"] == "60.00 ± 10.00" and cells["Avg"] == "60.00 ± 10.00 (3 seeds)"
    assert cells["Merge (s)"] == "2.0" and cells["Hyperparameters"] == "scaling=0.3"


def test_a_single_seed_row_prints_exactly_as_before(tmp_path):
    ties = make_result(method="ties", seed=0, average=0.55, hyperparameters={"keep": 0.2, "scaling": 0.3})
    for record in (ties, make_result(seed=0, average=0.5), make_result(seed=1, average=0.7)):
        append_result(tmp_path, record)
    board = table_rows(leaderboard_markdown(tmp_path))
    alone = table_rows(results_table(latest_per_configuration([ties])))
    assert alone[1] in board and board[0] == alone[0]
    (averaged,) = [row for row in board if row[0] == "task-arithmetic"]
    assert "60.00 ± 14.14 (2 seeds)" in averaged


def test_precisions_are_never_averaged_together():
    rows = mean_over_seeds([make_result(seed=0), make_result(seed=1), make_result(seed=0, precision="bf16")])
    assert sorted((type(r).__name__, r.precision) for r in rows) == [("Result", "bf16"), ("SeedMean", "fp32")]


def test_a_storage_that_differs_between_seeds_is_their_mean_with_its_spread():
    """A learned budget (FlexSwitch) stores another size per seed: the row shows the seeds'
    mean ± sample standard deviation, not the last seed's size; an equal size prints as before."""
    sizes = (5_000_000, 6_000_000, 7_000_000)
    (learned,) = mean_over_seeds([make_result(seed=seed, storage=size) for seed, size in enumerate(sizes)])
    assert learned.extra_storage_bytes == 6_000_000 and learned.storage_std == pytest.approx(1_000_000)
    cells = dict(zip(*table_rows(results_table([learned]))[:2]))
    assert cells["Extra storage (MB)"] == "6.00 ± 1.00"
    (fixed,) = mean_over_seeds([make_result(seed=seed, storage=5_000_000) for seed in range(3)])
    assert dict(zip(*table_rows(results_table([fixed]))[:2]))["Extra storage (MB)"] == "5.00"
    frame = to_frame([learned])
    assert frame.loc[0, "extra_storage_bytes"] == 6_000_000 and frame.loc[0, "extra_storage_std"] == pytest.approx(1e6)


def test_storage_differing_by_a_few_container_bytes_shows_no_spread():
    (row,) = mean_over_seeds([make_result(seed=seed, storage=17_520_000 + seed * 40) for seed in range(3)])
    assert dict(zip(*table_rows(results_table([row]))[:2]))["Extra storage (MB)"] == "17.52"
