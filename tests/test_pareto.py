"""The Fig. 8 analysis reads FlexSwitch and SASS T-Switch records and nothing else."""
from __future__ import annotations

import json

import pytest

from mergebench.analysis import AnalysisOptions, run_analysis
from mergebench.runner import run


def test_pareto_table_has_one_row_per_configuration_with_per_task_storage(tiny_bert, tmp_path):
    results = tmp_path / "results"
    for alpha in (0.5, 0.8):
        run("t-switch", "tiny-bert", hyperparameters={"alpha": alpha, "format": "sass"}, results_dir=results)
    run("t-switch", "tiny-bert", results_dir=results)  # the tswitch layout: not a Fig. 8 point
    flex = run("flexswitch", "tiny-bert", hyperparameters={"steps": 2, "exemplars": 8, "batch_size": 4, "reuse_training": False},
               results_dir=results)
    options = AnalysisOptions(output_dir=tmp_path / "out", results_dir=results, plot=False, command="test")
    run_analysis("pareto", tiny_bert, options)
    raw = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert sorted(raw) == ["flexswitch (kl)", "t-switch α=0.5", "t-switch α=0.8"]
    task = tiny_bert.tasks[0].name
    assert raw["flexswitch (kl)"]["task_megabytes"][task] == pytest.approx(
        flex.diagnostics["artifact_bytes"][f"{task}.sass"] / 1e6)
    assert raw["t-switch α=0.8"]["megabytes"] < raw["t-switch α=0.5"]["megabytes"]
    text = (tmp_path / "out" / "pareto.md").read_text()
    assert "Learned sparsity and bit-width, flexswitch (kl)" in text


def test_pareto_without_records_says_what_to_run(tiny_bert, tmp_path):
    options = AnalysisOptions(output_dir=tmp_path / "out", results_dir=tmp_path / "none", plot=False)
    from mergebench.errors import MergebenchError

    with pytest.raises(MergebenchError, match="--results-dir .*--hp format=sass"):
        run_analysis("pareto", tiny_bert, options)


def test_pareto_points_are_the_current_datas_and_flexswitch_formats_stay_apart():
    """Records on other data (another manifest, or none) are left out; a FlexSwitch record
    in ans is its own point beside the SASS one with the same loss."""
    from mergebench.analysis.pareto import latest_records
    from tests.test_results import make_result

    current = "cd" * 32

    def flex(fmt, data, created):
        return make_result(method="flexswitch", hyperparameters={"loss": "kl", "format": fmt}, data_manifest=data,
                           created=created)

    records = [flex("sass", None, "2026-01-01T00:00:00+00:00"), flex("sass", current, "2026-01-02T00:00:00+00:00"),
               flex("ans", current, "2026-01-03T00:00:00+00:00"), flex("ans", "ef" * 32, "2026-01-04T00:00:00+00:00")]
    chosen = latest_records(records, "tiny-bert", current)
    assert chosen == {"flexswitch (kl)": records[1], "flexswitch (kl, ans)": records[2]}
    assert latest_records(records, "tiny-bert") == {"flexswitch (kl)": records[0]}


def test_a_configuration_with_several_seeds_is_one_point_at_their_mean():
    """The newest record of each seed counts; the point is the seeds' mean accuracy and
    storage (FlexSwitch learns another budget per seed), its switches the lowest seed's."""
    from mergebench.analysis.pareto import latest_records
    from tests.test_results import make_result

    def flex(seed, accuracy, size, created):
        return make_result(method="flexswitch", seed=seed, average=accuracy, storage=size,
                           hyperparameters={"loss": "kl", "format": "sass"}, created=created,
                           diagnostics={"artifact_bytes": {"markers-a.sass": size // 2, "markers-b.sass": size // 2},
                                        "flexswitch": {"seed": seed}})

    records = [flex(0, 0.2, 1_000, "2026-01-01T00:00:00+00:00"), flex(1, 0.6, 3_000, "2026-01-02T00:00:00+00:00"),
               flex(0, 0.4, 2_000, "2026-01-03T00:00:00+00:00")]  # seed 0 again: the newer one counts
    (point,) = latest_records(records, "tiny-bert").values()
    assert point.average == pytest.approx(0.5) and point.metrics["markers-a"] == pytest.approx(0.5)
    assert point.extra_storage_bytes == 2_500
    assert point.diagnostics["artifact_bytes"]["markers-a.sass"] == pytest.approx(1_250)
    assert point.diagnostics["seeds"] == [0, 1] and point.diagnostics["flexswitch"] == {"seed": 0}


def test_records_of_another_configuration_under_the_same_label_are_not_its_seeds():
    """A FlexSwitch run with other steps is the same 'flexswitch (kl)' point, but not a seed
    of the newest configuration: the point averages the newest configuration's seeds only."""
    from mergebench.analysis.pareto import latest_records
    from tests.test_results import make_result

    def flex(seed, accuracy, steps, created):
        return make_result(method="flexswitch", seed=seed, average=accuracy, created=created,
                           hyperparameters={"loss": "kl", "format": "sass", "steps": steps})

    records = [flex(2, 0.9, 500, "2026-01-01T00:00:00+00:00"), flex(0, 0.4, 40, "2026-01-02T00:00:00+00:00"),
               flex(1, 0.6, 40, "2026-01-03T00:00:00+00:00")]
    (point,) = latest_records(records, "tiny-bert").values()
    assert point.average == pytest.approx(0.5) and point.diagnostics["seeds"] == [0, 1]
    assert point.hyperparameters["steps"] == 40
