"""Confidence intervals: the seeded bootstrap against a resample-by-resample loop written here
(scipy for the correlations), its width against 1/sqrt(n), strict reading of a record's
interval, the leaderboard's overlap mark, and a real tiny-bert run's recorded interval."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from mergebench.bootstrap import Sample, suite_interval
from mergebench.errors import RecordError
from mergebench.results import Result, append_result, iter_records
from mergebench.runner import run
from mergebench.table import OVERLAP_MARK, leaderboard_markdown, mean_over_seeds, results_table
from tests.test_results import make_result, table_rows


def fixed_samples() -> dict[str, Sample]:
    rng = np.random.default_rng(123)
    labels = rng.integers(0, 3, 30)
    predictions = np.where(rng.random(30) < 0.7, labels, (labels + 1) % 3)
    binary = rng.integers(0, 2, 40)
    binary_predictions = np.where(rng.random(40) < 0.8, binary, 1 - binary)
    gold = np.round(rng.normal(size=50), 1)  # rounded: ties, which Spearman's ranks share
    scores = np.round(gold + rng.normal(scale=0.7, size=50), 1)
    return {"three-way": Sample("accuracy", predictions, labels),
            "binary": Sample("matthews", binary_predictions, binary),
            "similarity": Sample("pearson_spearman", scores, gold)}


def loop_bootstrap(samples: dict[str, Sample], seed: int, resamples: int) -> tuple[dict, list[float]]:
    """The same draws (one (B, n) block of indices per task, in order), each resample scored
    on its own: accuracy by counting, Matthews of two binary vectors as their Pearson
    correlation, Pearson and Spearman by scipy."""
    rng = np.random.default_rng(seed)
    per_task = {}
    for name, sample in samples.items():
        rows = rng.integers(0, len(sample), size=(resamples, len(sample)))
        values = []
        for row in rows:
            x, y = sample.predictions[row], sample.labels[row]
            if sample.metric == "accuracy":
                values.append(np.count_nonzero(x == y) / len(y))
            elif sample.metric == "matthews":
                values.append(np.corrcoef(x.astype(float), y.astype(float))[0, 1])
            else:
                values.append((stats.pearsonr(x, y)[0] + stats.spearmanr(x, y)[0]) / 2)
        per_task[name] = np.array(values)
    average = np.mean(list(per_task.values()), axis=0)
    bounds = {name: np.percentile(values, [2.5, 97.5]) for name, values in per_task.items()}
    return bounds, list(np.percentile(average, [2.5, 97.5]))


def point_metrics(samples: dict[str, Sample]) -> dict[str, float]:
    out = {}
    for name, s in samples.items():
        if s.metric == "accuracy":
            out[name] = float(np.mean(s.predictions == s.labels))
        elif s.metric == "matthews":
            out[name] = float(np.corrcoef(s.predictions.astype(float), s.labels.astype(float))[0, 1])
        else:
            out[name] = float((stats.pearsonr(s.predictions, s.labels)[0] + stats.spearmanr(s.predictions, s.labels)[0]) / 2)
    return out


def test_bootstrap_matches_a_resample_loop_and_repeats_with_its_seed():
    samples = fixed_samples()
    metrics = point_metrics(samples)
    interval = suite_interval(samples, metrics, seed=7, resamples=300)
    task_bounds, average_bounds = loop_bootstrap(samples, seed=7, resamples=300)
    assert interval["seed"] == 7 and interval["resamples"] == 300 and interval["level"] == 0.95
    assert interval["average"] == pytest.approx(average_bounds, abs=1e-9)
    for name in samples:
        assert interval["tasks"][name] == pytest.approx(list(task_bounds[name]), abs=1e-9)
    assert suite_interval(samples, metrics, seed=7, resamples=300) == interval
    assert suite_interval(samples, metrics, seed=8, resamples=300)["average"] != interval["average"]
    average = sum(metrics.values()) / len(metrics)
    assert interval["average"][0] < average < interval["average"][1]


def test_a_task_without_a_sample_or_not_matching_its_metric_has_no_interval_nor_has_the_average():
    samples = fixed_samples()
    metrics = point_metrics(samples)
    detection = suite_interval({**samples, "boxes": None}, {**metrics, "boxes": 0.4}, resamples=50)
    assert detection["tasks"]["boxes"] is None and detection["average"] is None
    assert detection["tasks"]["three-way"] is not None
    wrong = suite_interval(samples, {**metrics, "binary": metrics["binary"] + 0.1}, resamples=50)
    assert wrong["tasks"]["binary"] is None and wrong["average"] is None


def test_width_shrinks_as_one_over_the_square_root_of_the_test_size():
    def width(n: int) -> float:
        labels = np.zeros(n, dtype=int)
        predictions = (np.arange(n) % 5 == 0).astype(int)  # 80 % correct at every size
        sample = {"task": Sample("accuracy", predictions, labels)}
        bounds = suite_interval(sample, {"task": 0.8})["average"]
        return bounds[1] - bounds[0]

    small, large = width(100), width(1600)
    assert small / large == pytest.approx(4.0, rel=0.2)  # sqrt(1600 / 100)
    assert small == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 100), rel=0.2)  # the normal approximation


def interval_of(average: float, low: float, high: float, tasks=("markers-a", "markers-b")) -> dict:
    return {"method": "percentile bootstrap", "level": 0.95, "resamples": 1000, "seed": 0,
            "average": [low, high], "tasks": {task: [low, high] for task in tasks}}


@pytest.mark.parametrize("change, field", [
    ({"average": [0.6, 0.7]}, "interval.average"),  # the estimate 0.5 is below it
    ({"average": [-1.5, 0.7]}, "interval.average"),
    ({"average": [0.4]}, "interval.average"),
    ({"tasks": {"markers-a": [0.4, 0.6]}}, "interval.tasks"),
    ({"tasks": {"markers-a": [0.4, 0.6], "markers-b": [0.55, 0.6]}}, "interval.tasks.markers-b"),
    ({"resamples": 0}, "interval.resamples"),
    ({"level": 95}, "interval.level"),
])
def test_a_record_with_a_bad_interval_is_refused_on_read_with_file_and_line(tmp_path, change, field):
    append_result(tmp_path, make_result(interval=interval_of(0.5, 0.4, 0.6)))
    record = json.loads(make_result(interval=interval_of(0.5, 0.4, 0.6)).to_json())
    record["interval"].update(change)
    with open(tmp_path / "tiny-bert.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    with pytest.raises(RecordError, match=rf"tiny-bert\.jsonl:2: {field}: "):
        list(iter_records(tmp_path))


def test_a_non_finite_bound_is_refused_and_a_record_without_an_interval_loads(tmp_path):
    old = json.loads(make_result().to_json())
    del old["interval"]
    bad = json.loads(make_result(interval=interval_of(0.5, 0.4, 0.6)).to_json())
    (tmp_path / "tiny-bert.jsonl").write_text(json.dumps(old) + "\n" +
                                              json.dumps(bad).replace("0.6]", "NaN]", 1) + "\n")
    with pytest.raises(RecordError, match=r"tiny-bert\.jsonl:2: interval\.average\[1\]: NaN"):
        list(iter_records(tmp_path))
    (tmp_path / "tiny-bert.jsonl").write_text(json.dumps(old) + "\n")
    ((_, loaded),) = iter_records(tmp_path)
    assert loaded.interval is None


def test_the_overlap_mark_appears_exactly_where_next_better_intervals_overlap(tmp_path):
    specs = {"dare": (0.80, 0.78, 0.82), "fisher": (0.79, 0.775, 0.805), "ties": (0.70, 0.68, 0.72),
             "task-arithmetic": (0.69, 0.66, 0.72), "regmean": (0.60, 0.59, 0.61), "breadcrumbs": (0.65, None, None)}
    results = [make_result(method=name, average=avg, metrics={"markers-a": avg, "markers-b": avg},
                           hyperparameters={}, interval=None if low is None else interval_of(avg, low, high))
               for name, (avg, low, high) in specs.items()]
    ranked = sorted((v for v in specs.items() if v[1][1] is not None), key=lambda item: -item[1][0])
    expected = {worse for (_, (_, bl, bh)), (worse, (_, wl, wh)) in zip(ranked, ranked[1:]) if wl <= bh and bl <= wh}
    assert expected == {"fisher", "task-arithmetic"}
    header, *rows = table_rows(results_table(results))
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    assert {name for name, row in cells.items() if row["Avg 95 % CI"].endswith(OVERLAP_MARK)} == expected
    assert cells["dare"]["Avg 95 % CI"] == "80.0 [78.0, 82.0]" and cells["breadcrumbs"]["Avg 95 % CI"] == "-"
    for result in results:
        append_result(tmp_path, result)
    board = leaderboard_markdown(tmp_path)
    assert "Avg 95 % CI: the average and its 95 % confidence interval" in board
    assert f"\n_{OVERLAP_MARK}: this row's 95 % interval" in board


def test_a_row_of_several_seeds_shows_the_mean_of_their_bounds():
    seeds = [make_result(seed=seed, average=avg, metrics={"markers-a": avg, "markers-b": avg},
                         interval=interval_of(avg, avg - d, avg + d)) for seed, avg, d in ((0, 0.5, 0.02), (1, 0.6, 0.04))]
    (row,) = mean_over_seeds(seeds)
    assert row.interval["average"] == pytest.approx([0.52, 0.58])
    assert row.interval["tasks"]["markers-a"] == pytest.approx([0.52, 0.58])
    header, line = table_rows(results_table([row]))
    assert dict(zip(header, line))["Avg 95 % CI"] == "55.0 [52.0, 58.0]"
    (alone,) = mean_over_seeds([seeds[0], make_result(seed=1)])
    assert alone.interval is None


def test_a_tiny_bert_run_records_an_interval_around_its_average(tiny_bert, tmp_path):
    result = run("task-arithmetic", "tiny-bert", results_dir=tmp_path)
    interval = result.interval
    assert interval["resamples"] == 1000 and interval["seed"] == 0 and interval["level"] == 0.95
    low, high = interval["average"]
    assert low < result.average < high and high - low > 0
    assert list(interval["tasks"]) == list(result.metrics)
    for task, (task_low, task_high) in interval["tasks"].items():
        assert task_low <= result.metrics[task] <= task_high
    ((_, stored),) = iter_records(tmp_path)
    assert isinstance(stored, Result) and stored.interval == interval


def test_the_data_frame_carries_the_bounds_of_the_average():
    from mergebench.results import to_frame

    frame = to_frame([make_result(interval=interval_of(0.5, 0.45, 0.56)), make_result(seed=1)])
    assert list(frame["average_low"][:1]) == [0.45] and list(frame["average_high"][:1]) == [0.56]
    assert frame["average_low"].isna().tolist() == [False, True]
