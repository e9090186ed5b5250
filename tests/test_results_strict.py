"""Strict result records: checked on write and on read, appended safely by concurrent
writers, saved elsewhere when the results folder cannot be written, and shown honestly
in the tables (full cost of reused training, unknown methods marked, old records
counted with today's defaults)."""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import re
from pathlib import Path

import pytest

import mergebench.results as results_module
from mergebench.errors import RecordError, ResultsWriteError
from mergebench.results import Result, append_result, check_writable, load_results
from mergebench.table import latest_per_configuration, leaderboard_markdown, results_table
from tests.test_results import make_result, section, table_rows

COMMITTED = Path(__file__).resolve().parent.parent / "results"


def good_record(**changes) -> dict:
    return {**dataclasses.asdict(make_result()), **changes}


def write_lines(path: Path, *records: dict) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # json.dumps writes NaN as NaN


def strict_loads(line: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


# --- the record schema ---------------------------------------------------------------------


def test_new_records_are_schema_4_with_cost_reuse_and_manifest():
    record = strict_loads(make_result().to_json())
    assert record["schema_version"] == 4
    assert record["training_seconds"] == record["merge_seconds"] == 0.25
    assert record["reused"] is False and record["checkpoint_manifest"] is None


def test_committed_version_1_records_load_as_they_are():
    lines = (COMMITTED / "minilm-l6.jsonl").read_text().splitlines()
    every = load_results(COMMITTED)
    assert len(every) == len(lines)
    results = [r for r, line in zip(every, lines) if '"schema_version"' not in line]  # written before version 2
    assert len(results) >= 31 and all(r.schema_version == 1 for r in results)
    plain = [r for r in results if not r.reused]
    assert all(r.training_seconds == r.merge_seconds for r in plain)
    # auto-flexswitch reused flexswitch's trained switches: its cost includes their training
    (reusing,) = [r for r in results if r.reused]
    assert reusing.method == "auto-flexswitch"
    trained = sum(entry["seconds"] for task, entry in reusing.diagnostics["flexswitch"].items() if task != "metric")
    assert math.isclose(reusing.training_seconds, reusing.merge_seconds + trained)
    assert reusing.training_seconds > 2000 > reusing.merge_seconds


# --- bad records are refused on write, before anything is written ---------------------------

BAD_WRITES = [
    (dict(metrics={"markers-a": math.nan, "markers-b": 0.5}, average=math.nan), r"metrics\.markers-a: NaN is not a finite number"),
    (dict(merge_seconds=math.inf, training_seconds=math.inf), r"merge_seconds: Infinity is not a finite number"),
    (dict(diagnostics={"routing": [0.5, -math.inf]}), r"diagnostics\.routing\[1\]: -Infinity is not a finite number"),
    (dict(metrics={"markers-a": 1.7, "markers-b": 0.5}, average=1.1), r"metrics\.markers-a: 1\.7 is outside \[-1, 1\]"),
    (dict(metrics={"markers-a": 0.25, "markers-b": 0.75}, average=0.6), r"average: 0\.6 is not the mean of the metrics \(0\.5\)"),
    (dict(extra_storage_bytes=-1), r"extra_storage_bytes: -1 is not a non-negative integer"),
    (dict(eval_seconds=-0.5), r"eval_seconds: -0\.5 is not a non-negative number"),
    (dict(seed=True), r"seed: True is not an integer"),
    (dict(training_seconds=9.0), r"training_seconds: 9\.0 differs from merge_seconds \(0\.25\) though nothing was reused"),
    (dict(training_seconds=0.1, reused=True), r"training_seconds: 0\.1 is less than merge_seconds"),
    (dict(checkpoint_manifest="abc"), r"checkpoint_manifest: 'abc' is not a SHA-256 hex digest"),
    (dict(data_manifest="ABC"), r"data_manifest: 'ABC' is not a SHA-256 hex digest"),
    (dict(metrics={}, average=0.0), r"metrics: not a non-empty object"),
]


@pytest.mark.parametrize("changes, message", BAD_WRITES)
def test_bad_record_raises_before_anything_is_written(tmp_path, changes, message):
    directory = tmp_path / "results"
    with pytest.raises(RecordError, match=r"^result of 'task-arithmetic' on 'tiny-bert': " + message):
        append_result(directory, make_result(**changes))
    assert not directory.exists()


def test_reused_training_costs_more_than_the_merge(tmp_path):
    result = make_result(reused=True, training_seconds=100.25, checkpoint_manifest="ab" * 32)
    append_result(tmp_path, result)
    assert load_results(tmp_path) == [result]


# --- bad records are refused on read, by file, line and field --------------------------------

BAD_READS = [
    (good_record(metrics={"markers-a": math.nan, "markers-b": 0.5}), r"metrics\.markers-a: NaN is not a finite number"),
    (good_record(average=math.inf), r"average: Infinity is not a finite number"),
    (good_record(metrics={"markers-a": 1.7, "markers-b": 0.5}, average=1.1), r"metrics\.markers-a: 1\.7 is outside \[-1, 1\]"),
    (good_record(average=0.75), r"average: 0\.75 is not the mean of the metrics \(0\.5\)"),
    (good_record(backbone="other-bert"), r"backbone: 'other-bert' does not belong in tiny-bert\.jsonl"),
    (good_record(metrics={"markers-a": "0.5", "markers-b": 0.5}), r"metrics\.markers-a: '0\.5' is not a number"),
    (good_record(reused="yes"), r"reused: 'yes' is not true or false"),
    (good_record(created="yesterday"), r"created: 'yesterday' is not an ISO 8601 time"),
    ({k: v for k, v in good_record().items() if k != "training_seconds"}, r"training_seconds: missing"),
    (good_record(schema_version=5), r"schema_version: 5 is not a schema version this mergebench reads"),
]


@pytest.mark.parametrize("record, message", BAD_READS)
def test_bad_record_on_read_names_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "tiny-bert.jsonl"
    write_lines(path, good_record(), record)
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: {message}"):
        load_results(tmp_path)
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: {message}"):
        leaderboard_markdown(tmp_path)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "tiny-bert.jsonl"
    path.write_bytes(make_result().to_json().encode() + b"\n" + make_result().to_json().encode()[:30] + b"\xff}\n")
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: not UTF-8 \(byte 0xff at column 31\)$"):
        load_results(tmp_path)


def test_version_1_record_needs_only_the_version_1_fields(tmp_path):
    old = {k: v for k, v in good_record().items()
           if k not in ("schema_version", "training_seconds", "reused", "checkpoint_manifest", "checkpoint_family")}
    write_lines(tmp_path / "tiny-bert.jsonl", old)
    (loaded,) = load_results(tmp_path)
    assert (loaded.schema_version, loaded.training_seconds, loaded.reused) == (1, 0.25, False)


# --- appends ---------------------------------------------------------------------------------


def append_many(directory: str, worker: int, count: int) -> None:
    for i in range(count):
        average = (worker * count + i) / 1000
        # a line of some 20 kB, far beyond what one pipe write keeps whole
        append_result(Path(directory), make_result(seed=worker, average=average, diagnostics={"i": i, "pad": "x" * 20_000}))


def test_concurrent_writers_lose_and_mangle_nothing(tmp_path):
    workers, count = 4, 50
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=append_many, args=(str(tmp_path), w, count)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    lines = (tmp_path / "tiny-bert.jsonl").read_text().splitlines()
    assert len(lines) == workers * count
    records = [strict_loads(line) for line in lines]
    assert sorted((r["seed"], r["diagnostics"]["i"]) for r in records) == [(w, i) for w in range(workers) for i in range(count)]
    assert len(load_results(tmp_path)) == workers * count
    assert os.listdir(tmp_path) == ["tiny-bert.jsonl"]


def test_append_after_a_crashed_writers_half_line_starts_a_new_line(tmp_path):
    path = tmp_path / "tiny-bert.jsonl"
    path.write_text(make_result().to_json() + "\n" + make_result().to_json()[:40])  # killed mid-write
    append_result(tmp_path, make_result(average=0.75))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and strict_loads(lines[2])["average"] == 0.75
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: not a valid result record"):
        load_results(tmp_path)


def test_check_writable_leaves_no_trace_and_cleans_old_temporary_files(tmp_path):
    directory = tmp_path / "results" / "nested"
    assert check_writable(directory) == directory
    assert os.listdir(tmp_path) == []  # the folders it made to test are gone again
    append_result(directory, make_result())
    (directory / ".tiny-bert.jsonl.k2j4_x.tmp").write_text("left by the old rename-based writer")
    check_writable(directory)
    assert os.listdir(directory) == ["tiny-bert.jsonl"]


def test_check_writable_names_the_path_it_cannot_write(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the results folder should be")
    with pytest.raises(ResultsWriteError, match=rf"^cannot write results to {re.escape(str(blocked))}: "):
        check_writable(blocked)


def test_recovery_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(results_module, "cache_dir", lambda: blocked / "cache")  # cannot hold a folder
    monkeypatch.setattr(results_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.raises(ResultsWriteError) as caught:
        append_result(blocked / "results", make_result())
    recovery = tmp_path / "tmp" / "mergebench-unsaved-results" / "tiny-bert.jsonl"
    assert f"the record was saved to {recovery}" in str(caught.value)
    assert Result.from_dict(strict_loads(recovery.read_text())) == make_result()


def test_nowhere_to_save_puts_the_record_in_the_message(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(results_module, "cache_dir", lambda: blocked / "cache")
    monkeypatch.setattr(results_module.tempfile, "gettempdir", lambda: str(blocked / "tmp"))
    with pytest.raises(ResultsWriteError, match="no recovery file could be written either; the record is: {"):
        append_result(blocked / "results", make_result())


# --- tables ----------------------------------------------------------------------------------


def test_run_table_shows_eval_time_peak_memory_and_full_cost_of_reused_training():
    fresh = make_result(method="flexswitch", merge_seconds=600.0, eval_seconds=30.0, peak_rss_bytes=1_940_000_000)
    reusing = make_result(method="auto-flexswitch", merge_seconds=50.0, training_seconds=650.0, reused=True,
                          eval_seconds=900.0, peak_rss_bytes=4_000_000_000)
    header, *rows = table_rows(results_table([fresh, reusing]))
    assert header[-4:] == ["Merge (s)", "Eval (s)", "Peak memory (MB)", "Hyperparameters"]
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    assert cells["flexswitch"]["Merge (s)"] == "600.0" and cells["flexswitch"]["Eval (s)"] == "30.0"
    assert cells["flexswitch"]["Peak memory (MB)"] == "1940"
    assert cells["auto-flexswitch"]["Merge (s)"] == "650.0 (reused)"
    assert cells["auto-flexswitch"]["Peak memory (MB)"] == "4000"


def test_leaderboard_marks_unknown_methods_and_lists_them_last(tmp_path):
    append_result(tmp_path, make_result(method="my-own-merge", hyperparameters={}, average=0.99))
    append_result(tmp_path, make_result(method="task-arithmetic", average=0.5))
    append_result(tmp_path, make_result(method="ties", hyperparameters={"keep": 0.2, "scaling": 0.3}, average=0.6))
    header, *rows = table_rows(section(leaderboard_markdown(tmp_path), "## tiny-bert"))
    assert [row[0] for row in rows] == ["task-arithmetic", "ties", "my-own-merge (unknown method)"]


def test_leaderboard_refuses_a_backbone_with_two_suites(tmp_path):
    path = tmp_path / "tiny-bert.jsonl"
    write_lines(path, good_record(), good_record(method="ties", suite="glue"))
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: suite: 'glue' contradicts {re.escape(str(path))}:1"):
        leaderboard_markdown(tmp_path)


def test_record_without_a_newer_hyperparameter_counts_with_its_default():
    old = make_result(method="t-switch", hyperparameters={"alpha": 0.5}, storage=1000, average=0.7)
    new = make_result(method="t-switch", hyperparameters={"alpha": 0.5, "format": "tswitch"}, storage=1000, average=0.8)
    (kept,) = latest_per_configuration([old, new])
    assert kept.average == 0.8
    (alone,) = latest_per_configuration([old])
    assert alone.hyperparameters == {"alpha": 0.5, "format": "tswitch"}  # shown with the default it ran with


def test_default_inference_contradicted_by_storage_keeps_both_records():
    old = make_result(method="t-switch", hyperparameters={"alpha": 0.5}, storage=1000, average=0.7)
    new = make_result(method="t-switch", hyperparameters={"alpha": 0.5, "format": "tswitch"}, storage=2000, average=0.8)
    kept = latest_per_configuration([old, new])
    assert [(r.hyperparameters, r.average) for r in kept] == [({"alpha": 0.5}, 0.7), ({"alpha": 0.5, "format": "tswitch"}, 0.8)]


def test_committed_leaderboard_shows_each_configuration_once():
    # the suite's first data version (six tasks with wordnet-pos), recorded before runs named their data manifest
    markdown = leaderboard_markdown(COMMITTED)
    (first_version,) = [part for part in markdown.split("\n## ")[1:] if part.startswith("minilm-l6 ") and "wordnet-pos" in part]
    rows = table_rows("## " + first_version)
    header, rows = rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]
    configurations = [(r["Method"], r["Hyperparameters"]) for r in rows]
    assert len(configurations) == len(set(configurations))
    assert sorted(r["Avg"] for r in rows if r["Method"] == "auto-switch") == ["76.01", "77.08"]
    # the three t-switch rows at 82.67 are three storage formats, and say so
    assert sorted(r["Hyperparameters"] for r in rows if r["Avg"] == "82.67") == ["alpha=0.5, format=ans",
                                                                                "alpha=0.5, format=sass",
                                                                                "alpha=0.5, format=tswitch"]
    (reusing,) = [r for r in rows if r["Method"] == "auto-flexswitch"]
    assert reusing["Merge (s)"] == "2447.5 (reused)"


def test_leaderboard_shows_the_package_versions_of_its_rows(tmp_path):
    append_result(tmp_path, make_result(versions={"torch": "2.13.0+cpu", "transformers": "5.23.0"}))
    append_result(tmp_path, make_result(method="ties", hyperparameters={"keep": 0.2, "scaling": 0.3},
                                        versions={"torch": "2.13.0+cpu", "transformers": "5.24.0"}))
    text = leaderboard_markdown(tmp_path)
    assert "_Package versions of these rows: torch 2.13.0+cpu; transformers 5.23.0 / 5.24.0._" in text


def test_default_inference_tolerates_a_few_header_bytes():
    old = make_result(method="t-switch", hyperparameters={"alpha": 0.5}, storage=12_380_000, average=0.7)
    new = make_result(method="t-switch", hyperparameters={"alpha": 0.5, "format": "tswitch"}, storage=12_381_500,
                      average=0.7)
    (kept,) = latest_per_configuration([old, new])
    assert kept.hyperparameters == {"alpha": 0.5, "format": "tswitch"} and kept.extra_storage_bytes == 12_381_500



def test_a_run_records_the_hash_of_the_data_it_was_scored_on(tiny_bert, monkeypatch):
    """A run records the manifest hash of the data its backbone ships (mini), none otherwise,
    and the record round-trips through the strict reader."""
    from mergebench.registry import BACKBONES
    from mergebench.runner import run

    mini_digest = BACKBONES.get("minilm-l6")().data_manifest_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", mini_digest)
    assert run("task-arithmetic", "tiny-bert", results_dir=None).data_manifest is None
    monkeypatch.setattr(type(tiny_bert), "data_manifest_hash", lambda self: mini_digest)
    result = run("task-arithmetic", "tiny-bert", results_dir=None)
    assert result.data_manifest == mini_digest
    assert strict_loads(result.to_json())["data_manifest"] == mini_digest


def test_leaderboard_never_ranks_rows_scored_on_different_data_together(tmp_path):
    """Rows with another data manifest, or none, get a section of their own."""
    v2 = "ab" * 32
    append_result(tmp_path, make_result(average=0.9))
    append_result(tmp_path, make_result(average=0.6, data_manifest=v2))
    markdown = leaderboard_markdown(tmp_path)
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == ["## tiny-bert (suite: tiny, data: manifest abababababab)",
                        "## tiny-bert (suite: tiny, data: not pinned (recorded before runs named the data manifest))"]
    pinned, unpinned = markdown.split("## tiny-bert")[1:]
    assert "60.00" in pinned and "90.00" not in pinned
    assert "90.00" in unpinned and "60.00" not in unpinned


def test_leaderboard_never_ranks_rows_scored_on_different_checkpoints_together(tmp_path):
    """Where one section's records name two checkpoint sets (the prepare manifest), each set
    is a section of its own, and the records naming none a third; one set stays one section."""
    first, second = "cd" * 32, "ef" * 32
    append_result(tmp_path, make_result(average=0.9, checkpoint_manifest=first))
    append_result(tmp_path, make_result(method="ties", hyperparameters={"keep": 0.2}, average=0.5))
    alone = [line for line in leaderboard_markdown(tmp_path).splitlines() if line.startswith("## ")]
    assert alone == ["## tiny-bert (suite: tiny)"]  # one set and records naming none: as before

    append_result(tmp_path, make_result(average=0.6, checkpoint_manifest=second))
    markdown = leaderboard_markdown(tmp_path)
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == ["## tiny-bert (suite: tiny, checkpoints: manifest cdcdcdcdcdcd)",
                        "## tiny-bert (suite: tiny, checkpoints: manifest efefefefefef)",
                        "## tiny-bert (suite: tiny, checkpoints: manifest not recorded)"]
    on_first, on_second, unrecorded = markdown.split("## tiny-bert")[1:]
    assert "90.00" in on_first and "60.00" not in on_first and "50.00" not in on_first
    assert "60.00" in on_second and "90.00" not in on_second
    assert "50.00" in unrecorded and "task-arithmetic" not in unrecorded
