"""The run as stages: resolve checks everything and does no work, the stages called by hand
give the numbers of ``run``, the CLI makes each method once and appends each record as soon
as it exists, and the table stays on screen when a write fails."""
from __future__ import annotations

from collections import Counter

import pytest

from mergebench.cli import main
from mergebench.errors import HyperparameterError, NotApplicableError, ResultsWriteError
from mergebench.method import Method
from mergebench.runner import (exemplars_for, load_pool, resolve, run, seed_everything, timed_evaluate,
                               timed_merge)


def test_resolve_checks_every_value_and_leaves_no_trace(tmp_path):
    plan = resolve("ties", "tiny-bert", seed=3, hyperparameters={"keep": 0.5}, batch_size=8,
                   results_dir=tmp_path / "results")
    assert plan.method.hparams == {"keep": 0.5, "scaling": 0.3, "merge_func": "mean"} and plan.method.seed == 3
    assert plan.protocol.name == "original" and plan.overrides == ("keep",)
    assert plan.backbone_class.name == "tiny-bert" and plan.batch_size == 8
    assert plan.results_dir == tmp_path / "results" and not plan.results_dir.exists()  # checked, then removed
    with pytest.raises(HyperparameterError, match="keep=2"):
        resolve("ties", "tiny-bert", hyperparameters={"keep": 2})
    with pytest.raises(NotApplicableError, match="'adamerging' is not applicable to backbone 'detr-r50'"):
        resolve("adamerging", "detr-r50")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ResultsWriteError, match=str(blocker)):
        resolve("task-arithmetic", "tiny-bert", results_dir=blocker / "results")


def test_the_stages_called_by_hand_give_the_numbers_of_run(tiny_bert):
    result = run("regmean", "tiny-bert", seed=1, hyperparameters={"exemplars": 8}, results_dir=None)
    plan = resolve("regmean", "tiny-bert", seed=1, hyperparameters={"exemplars": 8})
    backbone = plan.make_backbone()
    with load_pool(backbone) as pool:
        seed_everything(plan.seed)
        exemplars = exemplars_for(plan.method, backbone, pool.tasks, plan.seed)
        assert {task: len(inputs["input_ids"]) for task, inputs in exemplars.items()} == {t: 8 for t in pool.tasks}
        merged, merge_seconds = timed_merge(plan.method, pool, exemplars)
        metrics, eval_seconds = timed_evaluate(merged, backbone, pool.tasks, plan.batch_size)
    assert metrics == result.metrics and merge_seconds > 0 and eval_seconds > 0


@pytest.fixture
def made(monkeypatch) -> Counter:
    """How many times each method is made."""
    made = Counter()
    original = Method.__init__

    def counting(self, **overrides):
        made[self.name] += 1
        original(self, **overrides)

    monkeypatch.setattr(Method, "__init__", counting)
    return made


def test_the_cli_makes_each_method_once(tiny_bert, tmp_path, made):
    assert main(["run", "--method", "pretrained,task-arithmetic,ties", "--backbone", "tiny-bert",
                 "--results-dir", str(tmp_path)]) == 0
    assert made == {"pretrained": 1, "task-arithmetic": 1, "ties": 1}


def test_each_record_is_appended_at_once_and_the_table_survives_a_failed_write(tiny_bert, tmp_path, monkeypatch,
                                                                               capsys):
    import mergebench.results
    import mergebench.runner

    records = tmp_path / "tiny-bert.jsonl"
    lines_before_each_run = []
    real_execute, real_append = mergebench.runner.execute, mergebench.results.append_result

    def execute(plan):
        lines_before_each_run.append(len(records.read_text().splitlines()) if records.exists() else 0)
        return real_execute(plan)

    def append(results_dir, result):
        if result.method == "task-arithmetic":
            raise ResultsWriteError(f"cannot write results to {results_dir}: disk full")
        return real_append(results_dir, result)

    monkeypatch.setattr(mergebench.runner, "execute", execute)
    monkeypatch.setattr(mergebench.results, "append_result", append)
    code = main(["run", "--method", "pretrained,task-arithmetic,individual", "--backbone", "tiny-bert",
                 "--results-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert lines_before_each_run == [0, 1, 1]  # pretrained's record was written before the next run began
    first_cells = [line.strip("|").split("|")[0].strip() for line in out.splitlines() if line.startswith("|")]
    assert sorted(first_cells[2:]) == ["individual", "pretrained", "task-arithmetic"]  # the unsaved row too
    assert f"mergebench: error: cannot write results to {tmp_path}: disk full" in err
    assert len(records.read_text().splitlines()) == 2
