"""``mergebench sweep``: every configuration resolved before any work, grid keys routed to
the methods that declare them, one record per configuration, a rerun that adds none, and a
failing configuration that loses none of the others. Ray runs locally on 2 CPUs, started
once for the module."""
from __future__ import annotations

import sys

import pytest

from mergebench.cli import main
from mergebench.errors import HyperparameterError
from mergebench.registry import METHODS, register_method
from mergebench.results import iter_records
from mergebench.sweep import plan_sweep, result_key, run_sweep

TaskArithmetic = METHODS.get("task-arithmetic")


class RaisesInMerge(TaskArithmetic):
    """A method that fails inside merge, in the Ray worker (which imports this module)."""

    name = "test-sweep-raises"

    def merge(self, pool, exemplars=None):
        raise RuntimeError("merge failed on purpose")


@pytest.fixture(scope="module")
def local_ray(tiny_bert):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def raising_method(monkeypatch):
    METHODS.names()
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    register_method(RaisesInMerge.name)(RaisesInMerge)


def records(results_dir) -> list:
    return [result for _, result in iter_records(results_dir)]


def test_grid_keys_go_only_to_the_methods_that_declare_them(tiny_bert):
    configurations = plan_sweep(["task-arithmetic", "ties"], ["tiny-bert"], [0, 1],
                                {"scaling": [0.3], "keep": [0.2, 0.5]})
    points = sorted((c.plan.method.name, c.plan.seed, c.hyperparameters.get("keep")) for c in configurations)
    assert points == [("task-arithmetic", 0, None), ("task-arithmetic", 1, None),
                      ("ties", 0, 0.2), ("ties", 0, 0.5), ("ties", 1, 0.2), ("ties", 1, 0.5)]
    assert all(c.hyperparameters["scaling"] == 0.3 for c in configurations)
    assert len({c.key for c in configurations}) == len(configurations)


def test_every_bad_value_fails_before_any_work(tiny_bert, tmp_path, capsys):
    with pytest.raises(HyperparameterError, match="no selected method has hyperparameter keep"):
        plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], {"keep": [0.2]})
    with pytest.raises(HyperparameterError, match="keep=2"):
        plan_sweep(["ties"], ["tiny-bert"], [0], {"keep": [0.5, 2]})
    results = tmp_path / "results"
    assert main(["sweep", "--method", "ties", "--backbone", "tiny-bert,no-such-backbone",
                 "--results-dir", str(results)]) == 2
    assert "no-such-backbone" in capsys.readouterr().err and not results.exists()


def test_a_sweep_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    assert main(["sweep", "--method", "ties", "--backbone", "tiny-bert", "--results-dir", str(tmp_path)]) == 2
    assert "pip install 'mergebench[ray]'" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_sweep_records_every_configuration_and_a_rerun_adds_none(local_ray, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["sweep", "--method", "task-arithmetic,ties", "--backbone", "tiny-bert", "--seed", "0,1",
            "--grid", "scaling=0.1,0.3", "--results-dir", str(results)]
    assert main(argv) == 0
    recorded = records(results)
    expected = plan_sweep(["task-arithmetic", "ties"], ["tiny-bert"], [0, 1], {"scaling": [0.1, 0.3]})
    assert len(recorded) == 8 and {result_key(r) for r in recorded} == {c.key for c in expected}
    assert {(r.method, r.seed, r.hyperparameters["scaling"]) for r in recorded} == {
        (m, s, v) for m in ("task-arithmetic", "ties") for s in (0, 1) for v in (0.1, 0.3)}
    assert main(argv) == 0
    assert len(records(results)) == 8
    assert "0 recorded, 8 already recorded" in capsys.readouterr().err


def test_a_failing_configuration_loses_none_of_the_others(local_ray, raising_method, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["sweep", "--method", "test-sweep-raises,task-arithmetic", "--backbone", "tiny-bert",
                 "--grid", "scaling=0.1,0.3", "--results-dir", str(results)]) == 1
    assert sorted((r.method, r.hyperparameters["scaling"]) for r in records(results)) == [
        ("task-arithmetic", 0.1), ("task-arithmetic", 0.3)]
    err = capsys.readouterr().err
    assert "2 recorded, 0 already recorded, 2 failed" in err
    assert err.count("RuntimeError: merge failed on purpose") == 2 and "test-sweep-raises on tiny-bert" in err


def test_precision_is_part_of_the_key_and_a_gpu_run_needs_a_gpu_from_ray(tiny_bert, tmp_path):
    import dataclasses

    import torch

    (fp32,) = plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], {})
    (bf16,) = plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], {}, precision="bf16")
    assert bf16.plan.precision == "bf16" and bf16.key != fp32.key
    on_gpu = dataclasses.replace(fp32, plan=dataclasses.replace(fp32.plan, device=torch.device("cuda", 0)))
    with pytest.raises(HyperparameterError, match="--gpus-per-run 1 or more"):
        run_sweep([on_gpu], tmp_path / "results", gpus_per_run=0)
    assert not (tmp_path / "results").exists()


def test_an_interrupted_sweep_keeps_what_finished_and_a_rerun_resumes(local_ray, tmp_path, monkeypatch):
    import mergebench.sweep

    results = tmp_path / "results"
    configurations = plan_sweep(["task-arithmetic"], ["tiny-bert"], [0], {"scaling": [0.1, 0.2, 0.3, 0.4]})
    real_append = mergebench.sweep.append_result

    def append_then_interrupt(results_dir, result):  # Ctrl-C right after the first record
        real_append(results_dir, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(mergebench.sweep, "append_result", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(configurations, results, progress=False)
    (first,) = records(results)
    monkeypatch.setattr(mergebench.sweep, "append_result", real_append)
    report = run_sweep(configurations, results, progress=False)
    assert report.skipped == 1 and len(report.recorded) == 3 and not report.failed
    assert sorted(result_key(r) for r in records(results)) == sorted(c.key for c in configurations)
    assert result_key(first) not in {result_key(r) for r in report.recorded}
