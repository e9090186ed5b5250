"""What a run refuses before any work, what stops it without a record, and how errors read."""
from __future__ import annotations

import errno
import subprocess

import numpy as np
import pytest
import torch

from mergebench.cli import main
from mergebench.errors import CheckpointError, NonFiniteError
from mergebench.evaluate import all_finite, evaluate_task
from mergebench.memory import PeakMemory
from mergebench.method import Merged, Method, StaticMerged
from mergebench.merging import merge_task_vectors
from mergebench.registry import METHODS, register_method
from mergebench.runner import git_commit, run


def cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- refused before any work -------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--method", "task-arithmetic,ties", "--hp", "keep=2"], r"method 'ties': hyperparameter keep=2 .*\(0, 1\]"),
    (["--method", "task-arithmetic", "--hp", "scaling=NaN"], "scaling=nan is not allowed"),
    (["--method", "task-arithmetic", "--hp", "scaling=Infinity"], "scaling=inf is not allowed"),
    (["--method", "task-arithmetic", "--hp", "scaling=-1e308"], "scaling=-1e.308 is not allowed"),
    (["--method", "auto-switch", "--hp", "neighbours=0"], "neighbours=0 is not allowed; expected an integer >= 1"),
    (["--method", "regmean", "--hp", "exemplars=2.7"], "exemplars=2.7 is not allowed"),
    (["--method", "task-arithmetic", "--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["--method", "task-arithmetic", "--seed", "-1"], r"--seed -1 is not allowed; expected an integer in \[0, "),
    (["--method", "task-arithmetic", "--seed", str(2**32)], "--seed 4294967296 is not allowed"),
    (["--method", ""], "--method '' names no method; valid methods: .*task-arithmetic"),
    (["--method", " , "], "names no method"),
])
def test_bad_values_exit_2_before_any_work_and_record_nothing(tmp_path, capsys, monkeypatch, extra, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the values were checked")

    monkeypatch.setattr("mergebench.runner.execute", no_work)
    code, out, err = cli(["run", "--backbone", "tiny-bert", "--results-dir", str(tmp_path / "r"), *extra], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("mergebench: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r").exists()


def test_an_unwritable_results_dir_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mergebench.runner.execute", lambda *a, **k: pytest.fail("work started"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = cli(["run", "--method", "task-arithmetic", "--backbone", "tiny-bert",
                        "--results-dir", str(blocker / "results")], capsys)
    assert code == 2 and str(blocker) in err and err.count("\n") == 1


# --- the finite guard ----------------------------------------------------------------------


class _NaNScaling(Method):
    """Task arithmetic with an unbounded scaling: the merged weights overflow to inf."""

    name = "test-overflow"

    def merge(self, pool, exemplars=None):
        return StaticMerged(pool.backbone, merge_task_vectors(pool, lambda key, taus: 1e38 * 1e38 * taus[0]))


class _NaNLogits(Merged):
    def predict(self, task, inputs):
        logits = torch.zeros(len(next(iter(inputs.values()))), 2)
        logits[0, 1] = float("nan")
        return logits


class _NaNOutputs(Method):
    name = "test-nan-outputs"

    def merge(self, pool, exemplars=None):
        return _NaNLogits(pool.backbone)


@pytest.fixture
def isolated_methods(monkeypatch):
    METHODS.names()
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    register_method(_NaNScaling.name)(_NaNScaling)
    register_method(_NaNOutputs.name)(_NaNOutputs)
    return METHODS


def test_a_non_finite_merged_tensor_stops_the_run_naming_method_and_tensor(tiny_bert, tmp_path, isolated_methods):
    with pytest.raises(NonFiniteError, match=r"method 'test-overflow' on 'tiny-bert': merged tensor '.+' has NaN "
                                             r"or infinite values; nothing recorded"):
        run("test-overflow", "tiny-bert", results_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_logits_stop_the_run_naming_method_and_task(tiny_bert, tmp_path, isolated_methods, capsys):
    code, out, err = cli(["run", "--method", "test-nan-outputs", "--backbone", "tiny-bert",
                          "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "method 'test-nan-outputs' on 'tiny-bert': task 'markers-a': the outputs of test batch 0" in err
    assert list(tmp_path.iterdir()) == []


def test_all_finite_reads_nested_outputs():
    assert all_finite({"logits": torch.zeros(2), "boxes": [torch.ones(3), torch.tensor([1, 2])]})
    assert not all_finite({"logits": torch.zeros(2), "boxes": (torch.tensor([0.0, float("inf")]),)})


def test_a_nan_metric_is_refused(tiny_bert, monkeypatch):
    task = tiny_bert.task("markers-a")
    monkeypatch.setattr(task, "score", lambda outputs, targets: float("nan"))
    merged = _NaNOutputs().merge(type("Pool", (), {"backbone": tiny_bert})())
    merged.predict = lambda task, inputs: torch.zeros(len(next(iter(inputs.values()))), 2)
    with pytest.raises(NonFiniteError, match="task 'markers-a': its accuracy is nan"):
        evaluate_task(merged, task)


# --- errors: the project's own are one line, the rest keep their traceback -------------------


def test_an_internal_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr("mergebench.runner.execute", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--results-dir", str(tmp_path)])


def test_debug_shows_the_traceback_of_the_projects_own_errors(monkeypatch, tmp_path):
    def corrupt(*args, **kwargs):
        raise CheckpointError("x.safetensors: checksum mismatch")

    monkeypatch.setattr("mergebench.runner.execute", corrupt)
    argv = ["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--results-dir", str(tmp_path)]
    with pytest.raises(CheckpointError):
        main(["--debug", *argv])
    with pytest.raises(CheckpointError):
        main([*argv, "--debug"])  # after the command too
    assert main(argv) == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_environment_errors_are_one_line_naming_the_path(monkeypatch, tmp_path, capsys, code):
    def full(*args, **kwargs):
        raise OSError(code, __import__("os").strerror(code), "/data/cache/x.safetensors")

    monkeypatch.setattr("mergebench.runner.execute", full)
    exit_code, _, err = cli(["run", "--method", "task-arithmetic", "--backbone", "tiny-bert",
                             "--results-dir", str(tmp_path)], capsys)
    assert exit_code == 2 and err.strip().endswith(": /data/cache/x.safetensors") and err.count("\n") == 1


def test_other_os_errors_keep_their_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr("mergebench.runner.execute", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EBADF, "bad fd")))
    with pytest.raises(OSError, match="bad fd"):
        main(["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--results-dir", str(tmp_path)])


# --- honest figures ------------------------------------------------------------------------


def test_peak_memory_is_per_piece_of_work_not_the_process_high_water_mark():
    with PeakMemory() as big:
        block = np.ones(50_000_000)  # 400 MB
        del block
    with PeakMemory() as small:
        block = np.ones(1_000_000)
        del block
    assert big.bytes > small.bytes + 300_000_000, (big.scope, big.bytes, small.bytes)


def test_git_commit_ignores_the_files_runs_write(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "b.jsonl").write_text("{}\n")
    (tmp_path / "leaderboard.md").write_text("# board\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "files")
    (tmp_path / "results" / "b.jsonl").write_text("{}\n{}\n")
    (tmp_path / "leaderboard.md").write_text("# board 2\n")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path).endswith("-dirty")
