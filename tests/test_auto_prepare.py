"""Install + run are the only two commands: a run (or sweep) on a backbone that prepares
locally from its own data and is not prepared yet prepares it first, saying so once on
stderr; a backbone whose checkpoints come from elsewhere still stops at once, naming what
is missing and how to provide it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mergebench.cli import main
from mergebench.results import iter_records
from mergebench.sweep import plan_sweep
from mergebench.tasks.tiny import TinyBert

ANNOUNCED = "is not prepared yet; preparing it now"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, empty; tiny-bert fine-tunes for a few steps only (its own cache key)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    monkeypatch.setattr(TinyBert, "recipe", dataclasses.replace(TinyBert.recipe, steps=4, probe_steps=4,
                                                                probe_examples=32))
    return cache


def test_run_on_an_unprepared_offline_backbone_prepares_it_and_records(empty_cache, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["run", "--method", "task-arithmetic", "--backbone", "tiny-bert", "--results-dir", str(results)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count(ANNOUNCED) == 1 and "mergebench prepare --backbone tiny-bert" in err
    root = TinyBert().root
    assert Path(root).is_relative_to(empty_cache)
    assert all((Path(root) / f"{name}.safetensors").is_file()
               for name in ("pretrained", "markers-a", "markers-b", "markers-c"))
    (result,) = [r for _, r in iter_records(results)]
    assert result.method == "task-arithmetic" and set(result.metrics) == {"markers-a", "markers-b", "markers-c"}
    assert main(argv[:-2] + ["--results-dir", str(tmp_path / "again")]) == 0  # prepared now: nothing said
    assert ANNOUNCED not in capsys.readouterr().err


def test_a_sweep_prepares_once_in_the_driver(empty_cache, capsys):
    configurations = plan_sweep(["task-arithmetic", "weight-averaging"], ["tiny-bert"], [0, 1],
                                {"scaling": [0.1, 0.3]})
    assert len(configurations) == 6  # 2 x 2 task-arithmetic points, 2 weight-averaging ones
    assert capsys.readouterr().err.count(ANNOUNCED) == 1
    assert (Path(TinyBert().root) / "markers-c.safetensors").exists()  # before any configuration is dispatched


def test_a_vision_backbone_without_checkpoints_fails_fast_naming_them(empty_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub to fetch from: only local copies count
    argv = ["run", "--method", "task-arithmetic", "--backbone", "clip-vit-b32", "--results-dir", str(tmp_path / "r")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert ANNOUNCED not in err
    assert "clip-vit-b32: not found on this machine" in err
    assert "tanganke/clip-vit-base-patch32_mnist" in err and "--checkpoint-dir DIR" in err
    assert not (tmp_path / "r").exists() or not list(iter_records(tmp_path / "r"))
