"""Result records (append-only JSON lines, written atomically) and the leaderboard."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import pytest

from mergebench.errors import RecordError, ResultsWriteError
from mergebench.results import Result, append_result, load_results, results_file
from mergebench.table import latest_per_configuration, leaderboard_markdown, results_table


def make_result(method="task-arithmetic", backbone="tiny-bert", seed=0, average=0.5, storage=0, **changes) -> Result:
    fields = dict(
        method=method,
        backbone=backbone,
        suite="tiny" if backbone == "tiny-bert" else "other",
        seed=seed,
        hyperparameters={"scaling": 0.3} if method == "task-arithmetic" else {},
        metrics={"markers-a": average, "markers-b": average},
        average=average,
        extra_storage_bytes=storage,
        merge_seconds=0.25,
        eval_seconds=1.5,
        peak_rss_bytes=123,
        created="2025-01-01T00:00:00+00:00",
    )
    fields.update(changes)
    return Result(**fields)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- append_result -------------------------------------------------------------------------


def test_append_creates_directory_and_file(tmp_path):
    directory = tmp_path / "results" / "nested"
    result = make_result()
    path = append_result(directory, result)
    assert path == directory / "tiny-bert.jsonl" == results_file(directory, "tiny-bert")
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == dataclasses.asdict(result)
    assert path.read_bytes().endswith(b"\n")
    assert files_in(directory) == ["tiny-bert.jsonl"]  # no temp file left behind


def test_append_keeps_earlier_records(tmp_path):
    first, second = make_result(average=0.25), make_result(method="ties", average=0.75)
    append_result(tmp_path, first)
    append_result(tmp_path, second)
    assert load_results(tmp_path) == [first, second]
    assert len((tmp_path / "tiny-bert.jsonl").read_text().splitlines()) == 2
    assert files_in(tmp_path) == ["tiny-bert.jsonl"]


def test_one_file_per_backbone(tmp_path):
    append_result(tmp_path, make_result(backbone="tiny-bert"))
    append_result(tmp_path, make_result(backbone="other-bert"))
    assert files_in(tmp_path) == ["other-bert.jsonl", "tiny-bert.jsonl"]
    assert [r.backbone for r in load_results(tmp_path)] == ["other-bert", "tiny-bert"]


def test_append_after_a_file_without_final_newline(tmp_path):
    first = make_result(average=0.1)
    (tmp_path / "tiny-bert.jsonl").write_text(first.to_json())  # hand-edited, no trailing newline
    second = make_result(average=0.9)
    append_result(tmp_path, second)
    assert load_results(tmp_path) == [first, second]


def test_failed_write_keeps_previous_content_and_saves_the_record(tmp_path, monkeypatch, mergebench_cache):
    path = append_result(tmp_path, make_result(average=0.25))
    before = path.read_bytes()
    real_write = os.write

    def write_half_then_fail(fd, data):  # the disk fills up halfway through the line
        if os.fstat(fd).st_ino == path.stat().st_ino:
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_half_then_fail)
    lost = make_result(method="ties")
    with pytest.raises(ResultsWriteError) as caught:
        append_result(tmp_path, lost)
    recovery = mergebench_cache / "unsaved-results" / "tiny-bert.jsonl"
    assert str(path) in str(caught.value) and str(recovery) in str(caught.value)
    assert "No space left on device" in str(caught.value)
    assert path.read_bytes() == before  # the half line was cut off again
    assert [json.loads(line) for line in recovery.read_text().splitlines()][-1] == dataclasses.asdict(lost)
    assert files_in(tmp_path) == ["tiny-bert.jsonl"]


def test_failure_while_writing_keeps_previous_content(tmp_path, monkeypatch):
    path = append_result(tmp_path, make_result(average=0.25))
    before = path.read_bytes()

    def failing_fsync(fd):
        raise KeyboardInterrupt  # interrupted mid-write: BaseException, not just Exception

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(KeyboardInterrupt):
        append_result(tmp_path, make_result(method="ties"))
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["tiny-bert.jsonl"]


def test_failure_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    real_open = os.open

    def read_only_results(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_results)
    with pytest.raises(ResultsWriteError, match="Read-only file system"):
        append_result(tmp_path, make_result())
    assert files_in(tmp_path) == []


# --- load_results ----------------------------------------------------------------------------


def test_load_results_of_missing_or_empty_directory(tmp_path):
    assert load_results(tmp_path / "absent") == []
    (tmp_path / "notes.txt").write_text("not a results file")
    assert load_results(tmp_path) == []


def test_load_results_skips_blank_lines_and_ignores_unknown_fields(tmp_path):
    record = dataclasses.asdict(make_result())
    record["from_a_future_version"] = 1
    (tmp_path / "tiny-bert.jsonl").write_text("\n" + json.dumps(record) + "\n\n")
    assert load_results(tmp_path) == [make_result()]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "tiny-bert.jsonl"
    path.write_text(make_result().to_json() + "\n" + '{"method": "ties", \n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not a valid result record"):
        load_results(tmp_path)


def test_record_missing_fields_names_file_and_line(tmp_path):
    path = tmp_path / "tiny-bert.jsonl"
    path.write_text("\n".join([make_result().to_json(), make_result().to_json(), '{"method": "ties"}']) + "\n")
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:3: backbone: missing$"):
        load_results(tmp_path)


def test_non_object_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "tiny-bert.jsonl"
    path.write_text(make_result().to_json() + "\n" + "[1, 2]\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: "):
        load_results(tmp_path)


# --- tables and leaderboard -----------------------------------------------------------------


def test_latest_per_configuration_keeps_newest_record(tmp_path):
    records = [
        make_result(average=0.1),
        make_result(average=0.2, seed=1),
        make_result(average=0.3, hyperparameters={"scaling": 0.5}),
        make_result(average=0.4),  # supersedes the first
    ]
    latest = latest_per_configuration(records)
    assert sorted(r.average for r in latest) == [0.2, 0.3, 0.4]


def test_hyperparameter_order_does_not_split_configurations():
    a = make_result(method="ties", hyperparameters={"keep": 0.2, "scaling": 0.3}, average=0.1)
    b = make_result(method="ties", hyperparameters={"scaling": 0.3, "keep": 0.2}, average=0.9)
    assert [(r.average, r.hyperparameters["keep"]) for r in latest_per_configuration([a, b])] == [(0.9, 0.2)]


def table_rows(markdown: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-: ")]


def section(markdown: str, title: str) -> str:
    start = markdown.index(title)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else len(markdown)]


def test_leaderboard_groups_by_backbone_and_keeps_latest(tmp_path):
    append_result(tmp_path, make_result(method="task-arithmetic", average=0.111))
    append_result(tmp_path, make_result(method="pretrained", average=0.2, hyperparameters={}, reference=True))
    append_result(tmp_path, make_result(method="individual", average=0.9, storage=2_500_000, hyperparameters={},
                                        dynamic=True, reference=True, automatic=False))
    append_result(tmp_path, make_result(method="task-arithmetic", average=0.333))  # rerun: replaces 0.111
    append_result(tmp_path, make_result(method="task-arithmetic", average=0.444, seed=1))  # another seed: averaged
    append_result(tmp_path, make_result(method="ties", backbone="other-bert", average=0.555))

    text = leaderboard_markdown(tmp_path)
    assert text.startswith("# mergebench leaderboard\n")
    # sorted by name, a backbone that is not registered after the registered ones
    assert text.index("## tiny-bert (suite: tiny)") < text.index("## other-bert (unknown backbone) (suite: other)")

    tiny = section(text, "## tiny-bert")
    other = section(text, "## other-bert")
    assert "ties" not in tiny and "55.50" in other and "tiny-bert" not in other

    header, *rows = table_rows(tiny)
    assert header[:4] == ["Method", "Automatic", "Exemplars", "Extra storage (MB)"]
    assert header[4:7] == ["markers-a", "markers-b", "Avg"]
    by_method = {}
    for row in rows:
        by_method.setdefault(row[0], []).append(dict(zip(header, row)))
    assert sorted(by_method) == ["individual", "pretrained", "task-arithmetic"]
    assert [r["Avg"] for r in by_method["task-arithmetic"]] == ["38.85 ± 7.85 (2 seeds)"]  # 33.30 and 44.40
    assert "11.10" not in tiny
    # storage: '-' when nothing extra is kept, MB otherwise
    assert by_method["pretrained"][0]["Extra storage (MB)"] == "-"
    assert all(r["Extra storage (MB)"] == "-" for r in by_method["task-arithmetic"])
    assert by_method["individual"][0]["Extra storage (MB)"] == "2.50"
    assert by_method["individual"][0]["Automatic"] == "-"  # reference rows have no Automatic verdict
    assert by_method["task-arithmetic"][0]["Hyperparameters"] == "scaling=0.3"
    # reference rows first, pretrained on top
    assert [r[0] for r in rows][:2] == ["pretrained", "individual"]


def test_leaderboard_without_results(tmp_path):
    text = leaderboard_markdown(tmp_path)
    assert "No results yet" in text
    assert "## " not in text


def test_leaderboard_reports_malformed_file(tmp_path):
    (tmp_path / "tiny-bert.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="tiny-bert.jsonl:1"):
        leaderboard_markdown(tmp_path)


def test_results_table_columns_follow_tasks_of_all_results():
    a = make_result(metrics={"x": 0.5}, average=0.5)
    b = make_result(method="ties", metrics={"y": 1.0}, average=1.0)
    header, *rows = table_rows(results_table([a, b]))
    assert header[4:7] == ["x", "y", "Avg"]
    values = {row[0]: dict(zip(header, row)) for row in rows}
    assert values["task-arithmetic"]["x"] == "50.00" and values["task-arithmetic"]["y"] == ""
    assert values["ties"]["y"] == "100.00" and values["ties"]["Avg"] == "100.00"


def test_result_json_round_trip():
    result = make_result(versions={"torch": "2.0"}, git_commit="abc")
    assert Result.from_dict(json.loads(result.to_json())) == result
