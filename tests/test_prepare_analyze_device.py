"""``--device`` on ``prepare`` and ``analyze``: the default is the CPU and ``--device cpu``
changes no byte or number; a device this machine lacks is refused before any work with
run's message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mergebench.analysis as analysis_module
import mergebench.device as device_module
from mergebench.analysis.edits import Edit
from mergebench.analysis.probe import Prober
from mergebench.cli import main
from mergebench.device import resolve_device
from mergebench.errors import HyperparameterError
from mergebench.registry import BACKBONES


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)


def checkpoint_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.safetensors"))}


def test_prepare_with_device_cpu_writes_the_same_bytes_as_the_default(tmp_path, monkeypatch, capsys):
    caches = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / name))
        assert main(["prepare", "--backbone", "tiny-bert", *extra]) == 0
        assert "tiny-bert: ready" in capsys.readouterr().out
        caches[name] = checkpoint_bytes(tmp_path / name)
    assert len(caches["default"]) == 1 + 2 * len(BACKBONES.get("tiny-bert").task_names)  # pretrained, encoders, heads
    assert caches["cpu"] == caches["default"]


def run_refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def test_prepare_and_analyze_on_an_absent_gpu_fail_before_any_work(no_cuda, tmp_path, monkeypatch, capsys):
    with pytest.raises(HyperparameterError) as expected:
        resolve_device("cuda")
    message = f"mergebench: error: {expected.value}"
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))

    def no_work(*args, **kwargs):
        raise AssertionError("work started on a device this machine lacks")

    monkeypatch.setattr(BACKBONES.get("tiny-bert"), "prepare", no_work)
    monkeypatch.setattr(analysis_module, "run_analysis", no_work)
    assert run_refused(["prepare", "--backbone", "tiny-bert", "--device", "cuda"], capsys) == message
    assert run_refused(["analyze", "pulse", "--backbone", "tiny-bert", "--device", "cuda",
                        "--output-dir", str(tmp_path / "out")], capsys) == message
    assert "--device cuda: CUDA is not available" in message
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_analyze_with_device_cpu_gives_the_same_tables_as_the_default(tiny_bert, tmp_path, capsys):
    common = ["analyze", "pulse", "--backbone", "tiny-bert", "--examples", "8", "--alphas", "0.5", "--seeds", "1",
              "--no-plot", "--no-cache"]
    assert main([*common, "--output-dir", str(tmp_path / "default")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    capsys.readouterr()
    default, cpu = (json.loads((tmp_path / name / "pulse.json").read_text()) for name in ("default", "cpu"))
    default.pop("command", None), cpu.pop("command", None)
    assert cpu == default
    tables = [(tmp_path / name / "pulse.md").read_text().replace(" --device cpu", "").replace(str(tmp_path / name), "")
              for name in ("default", "cpu")]
    assert tables[0] == tables[1]


def test_analysis_points_off_the_cpu_are_cached_apart(tiny_bert, tmp_path):
    cpu = Prober(tiny_bert, examples=8, cache=tmp_path / "points.json", device="cpu")
    assert cpu._key(Edit("full")) == Prober(tiny_bert, examples=8, cache=tmp_path / "points.json")._key(Edit("full"))
    gpu = Prober(tiny_bert, examples=8, cache=tmp_path / "points.json", device="cuda")
    assert gpu._key(Edit("full")) != cpu._key(Edit("full"))
