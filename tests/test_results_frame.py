"""Result records as a pandas DataFrame (mergebench.results.load / to_frame) and the
``mergebench results`` command that prints it; checked against the JSON lines read directly."""
from __future__ import annotations

import io
import json
import statistics

import pandas as pd
import pytest

from mergebench.cli import main
from mergebench.errors import RecordError
from mergebench.results import append_result, load, results_file, to_frame
from mergebench.table import latest_per_configuration, mean_over_seeds
from tests.test_results import make_result


def write_records(tmp_path):
    records = [
        make_result(seed=0, average=0.5, protocol="original"),
        make_result(seed=1, average=0.7, protocol="original"),
        make_result(method="ties", average=0.6, storage=2_000_000, protocol="original",
                    hyperparameters={"keep": 0.2, "scaling": 0.3}, overrides=["keep", "scaling"],
                    metrics={"markers-a": 0.5, "markers-b": 0.7}, examples={"markers-a": 10, "markers-b": 12}, versions={"torch": "2.13.0"}),
        make_result(backbone="other-net", average=0.25, metrics={"x": 0.25}),
    ]
    for record in records:
        append_result(tmp_path, record)
    return records


def raw_lines(tmp_path, backbone):
    return [json.loads(line) for line in results_file(tmp_path, backbone).read_text().splitlines()]


def test_one_row_per_record_with_flattened_metrics_and_hyperparameters(tmp_path):
    write_records(tmp_path)
    frame = load(tmp_path)
    raw = raw_lines(tmp_path, "other-net") + raw_lines(tmp_path, "tiny-bert")  # files in name order
    assert len(frame) == len(raw) == 4
    for (_, row), record in zip(frame.iterrows(), raw):
        assert row["method"] == record["method"] and row["seed"] == record["seed"]
        assert row["average"] == record["average"] and row["extra_storage_bytes"] == record["extra_storage_bytes"]
        for task, value in record["metrics"].items():
            assert row[f"metric.{task}"] == value
        for name, value in record["hyperparameters"].items():
            assert row[f"hp.{name}"] == value
        assert row["overrides"] == ",".join(record["overrides"])
        assert pd.isna(row["protocol"]) if record["protocol"] is None else row["protocol"] == record["protocol"]
        for package, version in record["versions"].items():
            assert row[f"version.{package}"] == version
        assert row["device"] == record["device"] and row["precision"] == record["precision"]
    ties = frame[frame["method"] == "ties"].iloc[0]
    assert ties["examples.markers-b"] == 12 and ties["where"] == f"{results_file(tmp_path, 'tiny-bert')}:3"
    other = frame[frame["backbone"] == "other-net"].iloc[0]
    assert pd.isna(other["metric.markers-a"]) and other["metric.x"] == 0.25 and pd.isna(other["hp.keep"])
    # the record's fields first, metrics before the average, hyperparameters after the fields
    columns = list(frame.columns)
    assert columns.index("seed") < columns.index("metric.x") < columns.index("average") < columns.index("hp.keep")


def test_a_single_file_loads_alone(tmp_path):
    write_records(tmp_path)
    frame = load(results_file(tmp_path, "tiny-bert"))
    assert set(frame["backbone"]) == {"tiny-bert"} and len(frame) == 3
    assert frame["average"].mean() == pytest.approx(statistics.fmean([0.5, 0.7, 0.6]))


def test_a_missing_path_and_a_malformed_record_are_named(tmp_path):
    with pytest.raises(RecordError, match="nowhere: no such results file or folder"):
        load(tmp_path / "nowhere")
    write_records(tmp_path)
    with results_file(tmp_path, "tiny-bert").open("a") as handle:
        handle.write('{"method": "ties"}\n')
    with pytest.raises(RecordError, match=r"tiny-bert\.jsonl:4: "):
        load(tmp_path)


def test_rows_of_several_seeds_carry_their_count_and_sample_deviation(tmp_path):
    records = write_records(tmp_path)[:3]
    frame = to_frame(mean_over_seeds(latest_per_configuration(records)))
    mean = frame[frame["method"] == "task-arithmetic"].iloc[0]
    assert mean["seeds"] == 2 and mean["average"] == pytest.approx(0.6)
    assert mean["average_std"] == pytest.approx(abs(0.7 - 0.5) / 2 ** 0.5)  # sample std of two values
    assert mean["std.markers-a"] == pytest.approx(abs(0.7 - 0.5) / 2 ** 0.5)
    single = frame[frame["method"] == "ties"].iloc[0]
    assert single["seeds"] == 1 and pd.isna(single["average_std"])


def test_the_results_command_prints_csv_json_and_markdown(tmp_path, capsys):
    write_records(tmp_path)
    assert main(["results", "--results-dir", str(tmp_path), "--backbone", "tiny-bert", "--format", "csv"]) == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    raw = raw_lines(tmp_path, "tiny-bert")
    assert list(csv["average"]) == [r["average"] for r in raw] and list(csv["metric.markers-b"]) == \
        [r["metrics"]["markers-b"] for r in raw]
    assert main(["results", "--results-dir", str(tmp_path), "--method", "ties", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["hp.keep"] == 0.2 and row["overrides"] == "keep,scaling" and row["backbone"] == "tiny-bert"
    assert main(["results", "--results-dir", str(tmp_path), "--backbone", "tiny-bert", "--latest",
                 "--format", "markdown"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2  # header, rule, one row per configuration (two seeds are one row)
    assert "average_std" in lines[0] and "| task-arithmetic" in "\n".join(lines)


def test_the_results_command_names_a_backbone_without_records(tmp_path, capsys):
    write_records(tmp_path)
    assert main(["results", "--results-dir", str(tmp_path), "--backbone", "vit-b32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'vit-b32'" in err and "other-net, tiny-bert" in err
