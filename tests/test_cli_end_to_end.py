"""The real command line on the tiny suite: run, leaderboard, list, and its errors."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from mergebench.cli import main
from mergebench.results import Result
from mergebench.tasks.tiny import TASKS

METHODS = ("pretrained", "individual", "task-arithmetic")


def table_rows(text: str) -> list[list[str]]:
    """Cells of the github-style table lines of ``text`` (header first, separator dropped)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-: ")]


@pytest.fixture(scope="module")
def cli_run(tiny_bert, tmp_path_factory):
    """One real ``mergebench run`` of three methods, shared by the tests of this module."""
    results_dir = tmp_path_factory.mktemp("results")
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["run", "--method", ",".join(METHODS), "--backbone", "tiny-bert", "--results-dir", str(results_dir)]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    records = [json.loads(line) for line in (results_dir / "tiny-bert.jsonl").read_text().splitlines()]
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "dir": results_dir,
            "records": {r["method"]: r for r in records}, "lines": len(records)}


def test_run_returns_zero_and_prints_a_row_per_method(cli_run):
    assert cli_run["code"] == 0, cli_run["stderr"]
    header, *rows = table_rows(cli_run["stdout"])
    assert header[0] == "Method"
    task_columns = [h for h in header if h in TASKS]
    assert task_columns == list(TASKS)
    assert header.index("Avg") == header.index(task_columns[-1]) + 1
    assert sorted(row[0] for row in rows) == sorted(METHODS)
    assert len(rows) == len(METHODS)
    for row in rows:
        cells = dict(zip(header, row))
        for column in (*TASKS, "Avg"):
            assert 0.0 <= float(cells[column]) <= 100.0
    assert f"appended 3 record(s) to {cli_run['dir'] / 'tiny-bert.jsonl'}" in cli_run["stdout"]


def test_printed_averages_match_the_records(cli_run):
    header, *rows = table_rows(cli_run["stdout"])
    for row in rows:
        cells = dict(zip(header, row))
        record = cli_run["records"][cells["Method"]]
        assert cells["Avg"] == f"{100 * record['average']:.2f}"
        for task in TASKS:
            assert cells[task] == f"{100 * record['metrics'][task]:.2f}"


def test_records_have_the_result_fields(cli_run):
    assert cli_run["lines"] == 3
    assert set(cli_run["records"]) == set(METHODS)
    fields = {f.name for f in dataclasses.fields(Result)}
    for method, record in cli_run["records"].items():
        assert set(record) == fields, method
        assert record["backbone"] == "tiny-bert" and record["suite"] == "tiny" and record["seed"] == 0
        assert list(record["metrics"]) == list(TASKS)
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
        assert math.isclose(record["average"], sum(record["metrics"].values()) / len(TASKS), rel_tol=1e-12)
        assert "git_commit" in record
        assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", record["git_commit"])
        assert record["versions"]["torch"] == version("torch")
        assert "python" in record["versions"] and "mergebench" in record["versions"]
        assert record["merge_seconds"] >= 0 and record["eval_seconds"] > 0 and record["peak_rss_bytes"] > 0
        assert re.match(r"\d{4}-\d\d-\d\dT", record["created"])
    assert cli_run["records"]["task-arithmetic"]["hyperparameters"] == {"scaling": 0.3}
    assert cli_run["records"]["pretrained"]["reference"] is True
    assert cli_run["records"]["individual"]["dynamic"] is True


def test_extra_storage_only_for_individual(cli_run, tiny_bert):
    records = cli_run["records"]
    checkpoints = sum(tiny_bert.finetuned_checkpoint(task).stat().st_size for task in TASKS)
    assert checkpoints > 0
    assert records["individual"]["extra_storage_bytes"] == checkpoints
    assert records["pretrained"]["extra_storage_bytes"] == 0
    assert records["task-arithmetic"]["extra_storage_bytes"] == 0


def test_individual_beats_pretrained(cli_run):
    records = cli_run["records"]
    assert records["individual"]["average"] > records["pretrained"]["average"]
    # on every task, each fine-tuned encoder is at least as good as the pretrained one
    for task in TASKS:
        assert records["individual"]["metrics"][task] >= records["pretrained"]["metrics"][task], task


def test_same_seed_gives_the_same_numbers_and_no_save_writes_nothing(cli_run, capsys):
    code = main(["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--no-save",
                 "--results-dir", str(cli_run["dir"])])
    assert code == 0
    out = capsys.readouterr().out
    assert "appended" not in out
    header, row = table_rows(out)
    cells = dict(zip(header, row))
    record = cli_run["records"]["task-arithmetic"]
    for task in TASKS:
        assert cells[task] == f"{100 * record['metrics'][task]:.2f}"
    assert len((cli_run["dir"] / "tiny-bert.jsonl").read_text().splitlines()) == 3


def test_leaderboard_from_the_run(cli_run, tmp_path, capsys):
    output = tmp_path / "leaderboard.md"
    assert main(["leaderboard", "--results-dir", str(cli_run["dir"]), "--output", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    text = output.read_text()
    assert "## tiny-bert (suite: tiny)" in text
    header, *rows = table_rows(text.split("## tiny-bert", 1)[1])
    assert sorted(row[0] for row in rows) == sorted(METHODS)
    for row in rows:
        cells = dict(zip(header, row))
        assert cells["Avg"] == f"{100 * cli_run['records'][row[0]]['average']:.2f}"
    # the figure beside it, and no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard-tiny-bert.png", "leaderboard.md"]


# --- errors: exit code 2 and a message on stderr, before any work ---------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_method_exits_2_and_lists_valid_names(tmp_path, capsys):
    results = tmp_path / "results"
    code, out, err = run_cli(
        ["run", "--method", "pretrained,task-arithmetik", "--backbone", "tiny-bert", "--results-dir", str(results)],
        capsys,
    )
    assert code == 2
    assert out == ""
    assert err.startswith("mergebench: error: unknown method 'task-arithmetik'")
    for name in ("pretrained", "individual", "task-arithmetic", "ties", "dare", "weight-averaging"):
        assert name in err
    assert not results.exists()  # failed before the first method ran


def test_unknown_backbone_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["run", "--method", "pretrained", "--backbone", "nope", "--results-dir", str(tmp_path)], capsys)
    assert code == 2
    assert "unknown backbone 'nope'" in err and "tiny-bert" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "hp, message",
    [
        ("scaling", "'scaling' is not of the form key=value"),
        ("=0.5", "'=0.5' is not of the form key=value"),
        ("scalling=0.5", "no hyperparameter scalling; valid: scaling"),
    ],
)
def test_bad_hyperparameter_exits_2(tmp_path, capsys, hp, message):
    code, _, err = run_cli(
        ["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--hp", hp, "--results-dir", str(tmp_path)],
        capsys,
    )
    assert code == 2
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_bad_hyperparameter_with_several_methods_exits_2(tiny_bert, tmp_path, capsys):
    code, _, err = run_cli(
        ["run", "--method", "pretrained,task-arithmetic", "--backbone", "tiny-bert", "--hp", "scalling=0.5",
         "--no-save", "--results-dir", str(tmp_path)],
        capsys,
    )
    assert code == 2
    assert "scalling" in err


def test_hyperparameter_override_is_recorded(tiny_bert, tmp_path, capsys):
    code, out, _ = run_cli(
        ["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--hp", "scaling=0.5", "--seed", "3",
         "--results-dir", str(tmp_path)],
        capsys,
    )
    assert code == 0
    (record,) = [json.loads(line) for line in (tmp_path / "tiny-bert.jsonl").read_text().splitlines()]
    assert record["hyperparameters"] == {"scaling": 0.5}
    assert record["seed"] == 3
    assert "scaling=0.5" in out


def test_missing_required_argument_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--method", "pretrained"])
    assert info.value.code == 2
    assert "--backbone" in capsys.readouterr().err


# --- the installed console script ------------------------------------------------------------


def test_console_script_lists_backbones_and_methods():
    script = Path(sys.executable).with_name("mergebench")
    command = [str(script), "list"] if script.exists() else [sys.executable, "-m", "mergebench.cli", "list"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "Methods" in out and "Backbones" in out and "Suites" in out
    for name in ("tiny-bert", "pretrained", "individual", "task-arithmetic", "ties", "dare", "weight-averaging"):
        assert re.search(rf"^{re.escape(name)}\s", out, re.MULTILINE), name
    assert re.search(r"^tiny\s+.*tiny-bert", out, re.MULTILINE)  # the suite row


def test_hyperparameter_with_several_methods_goes_to_the_methods_that_have_it(tiny_bert, tmp_path, capsys):
    code, out, _ = run_cli(
        ["run", "--method", "pretrained,task-arithmetic", "--backbone", "tiny-bert", "--hp", "scaling=0.5",
         "--results-dir", str(tmp_path)],
        capsys,
    )
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "tiny-bert.jsonl").read_text().splitlines()]
    assert {r["method"]: r["hyperparameters"] for r in records} == {"pretrained": {}, "task-arithmetic": {"scaling": 0.5}}


def test_non_numeric_hyperparameter_exits_2_naming_it(tiny_bert, tmp_path, capsys):
    code, _, err = run_cli(
        ["run", "--method", "ties", "--backbone", "tiny-bert", "--hp", "keep=abc", "--no-save"], capsys
    )
    assert code == 2
    assert "keep" in err and "number" in err
