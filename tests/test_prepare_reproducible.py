"""Local fine-tuning gives the same checkpoints whatever the thread count, and ``prepare``
says whether they are the ones the committed results were scored with."""
from __future__ import annotations

import torch

from mergebench.manifest import prepare_checkpoints
from mergebench.tasks._text_classification import cpu_threads
from mergebench.tasks.tiny import TinyBert


def test_fine_tuning_runs_on_one_cpu_thread_and_restores_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path))
    seen = []
    fine_tune = TinyBert._fine_tune

    def spy(self, task):
        seen.append(torch.get_num_threads())
        fine_tune(self, task)

    monkeypatch.setattr(TinyBert, "_fine_tune", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        TinyBert().prepare()
        assert seen == [1] * len(TinyBert.task_names) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_checkpoints_do_not_depend_on_the_callers_thread_count(tmp_path, monkeypatch):
    before, digests = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / f"threads-{threads}"))
            torch.set_num_threads(threads)
            digests.append(prepare_checkpoints(TinyBert()).files)
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1] and len(digests[0]) == 1 + len(TinyBert.task_names)


def test_cpu_threads_leaves_other_devices_alone():
    before = torch.get_num_threads()
    with cpu_threads(1, torch.device("meta")):
        assert torch.get_num_threads() == before
    with cpu_threads(1, torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_prepare_says_whether_the_checkpoints_reproduce_the_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "first"))
    digest = prepare_checkpoints(TinyBert()).sha256
    assert "checkpoint" not in capsys.readouterr().err  # no reference: nothing said

    monkeypatch.setattr(TinyBert, "reference_checkpoints", digest)
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "second"))
    prepare_checkpoints(TinyBert())
    assert f"tiny-bert: the checkpoints reproduce the committed results' (checkpoint manifest {digest[:12]})" \
        in capsys.readouterr().err
    prepare_checkpoints(TinyBert())  # already prepared: said once, when written
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(TinyBert, "reference_checkpoints", "0" * 64)
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "third"))
    prepare_checkpoints(TinyBert())
    err = capsys.readouterr().err
    assert f"(manifest {digest[:12]}) differ from those the committed results used (000000000000)" in err


def test_fine_tuning_in_processes_gives_the_checkpoints_of_one_after_another(tmp_path, monkeypatch):
    from mergebench.tasks import _text_classification as text_classification

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "sequential"))
    sequential = prepare_checkpoints(TinyBert()).files
    monkeypatch.setattr(text_classification, "usable_cores", lambda: 4)
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "processes"))
    backbone = TinyBert()
    backbone.fine_tune_processes = 2
    used = []
    in_processes = TinyBert._fine_tune_in_processes

    def spy(self, tasks, processes):
        used.append(processes)
        in_processes(self, tasks, processes)

    monkeypatch.setattr(TinyBert, "_fine_tune_in_processes", spy)
    assert prepare_checkpoints(backbone).files == sequential and used == [2]


def test_the_processes_are_bounded_by_tasks_cores_and_free_memory(tmp_path, monkeypatch):
    from mergebench.tasks import _text_classification as text_classification

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path))
    backbone = TinyBert()
    backbone.fine_tune_processes, backbone.fine_tune_bytes = 8, 1_000
    monkeypatch.setattr(text_classification, "usable_cores", lambda: 6)
    monkeypatch.setattr(text_classification, "available_ram", lambda: 10_000)
    assert backbone._processes(3) == 3 and backbone._processes(8) == 6
    monkeypatch.setattr(text_classification, "available_ram", lambda: 2_500)
    assert backbone._processes(8) == 2
    monkeypatch.setattr(text_classification, "available_ram", lambda: 500)
    assert backbone._processes(8) == 1
    assert TinyBert()._processes(8) == 1  # the default: one after another
