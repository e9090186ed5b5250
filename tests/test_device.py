"""Devices and precision: a device this machine lacks is refused before any work with a
message naming what was asked and what exists, the record keeps where and how a run was
evaluated (old records load as CPU float32), bf16 stays close to fp32, and the reference
methods give the same numbers on every available device."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import mergebench.device as device_module
from mergebench.cli import main
from mergebench.device import autocast, check_precision, describe_device, resolve_device, to_cpu_float
from mergebench.errors import HyperparameterError, RecordError
from mergebench.method import Method
from mergebench.results import PRECISIONS, SCHEMA_VERSION, Result, load_results
from mergebench.runner import resolve, run
from mergebench.table import leaderboard_markdown
from tests.test_results import make_result

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# --- resolution -----------------------------------------------------------------------------


def test_auto_is_the_cpu_on_a_machine_without_accelerators(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_names_what_was_asked_and_found(no_cuda):
    with pytest.raises(HyperparameterError, match=r"--device cuda: CUDA is not available \(torch .*; found: cpu\)"):
        resolve_device("cuda")
    with pytest.raises(HyperparameterError, match=r"--device mps: MPS is not available .*found: cpu\)"):
        resolve_device("mps")
    with pytest.raises(HyperparameterError, match=r"--device 'gpu' is not allowed; expected one of auto, cpu"):
        resolve_device("gpu")


def test_cuda_index_beyond_the_count_names_the_count(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(HyperparameterError, match=r"--device cuda:2: this machine has 2 CUDA devices \(found: cpu, "
                                                  r"cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_precision_checks():
    cpu = torch.device("cpu")
    assert check_precision("fp32", cpu) == "fp32" and check_precision("bf16", cpu) == "bf16"
    with pytest.raises(HyperparameterError, match="fp16 is not supported on the CPU; use bf16 or fp32"):
        check_precision("fp16", cpu)
    with pytest.raises(HyperparameterError, match="--precision 'fp8' is not allowed"):
        check_precision("fp8", cpu)
    assert tuple(device_module.PRECISIONS) == PRECISIONS  # the names records accept


def test_fp32_is_no_autocast_and_bf16_is():
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert out.dtype == torch.bfloat16 and to_cpu_float(out).dtype == torch.float32
    kept = torch.ones(3)
    assert to_cpu_float(kept) is kept  # the float32 CPU path hands the very tensor on
    assert describe_device(cpu) == "cpu"


def test_an_absent_device_is_refused_before_any_merge(no_cuda, tiny_bert, tmp_path, monkeypatch, capsys):
    def never(self, **overrides):
        raise AssertionError("a merge started")

    with pytest.raises(HyperparameterError, match="--device cuda: CUDA is not available"):
        resolve("task-arithmetic", "tiny-bert", device="cuda")
    monkeypatch.setattr(Method, "merge", never)
    code = main(["run", "--method", "pretrained,task-arithmetic", "--backbone", "tiny-bert", "--device", "cuda",
                 "--results-dir", str(tmp_path / "results")])
    assert code != 0 and "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    code = main(["run", "--method", "pretrained", "--backbone", "tiny-bert", "--precision", "fp16",
                 "--results-dir", str(tmp_path / "results")])
    assert code != 0 and "fp16 is not supported on the CPU" in capsys.readouterr().err


# --- records --------------------------------------------------------------------------------


def test_records_store_device_and_precision_and_version_2_records_load_as_cpu_fp32(tmp_path):
    record = json.loads(make_result().to_json())
    assert record["schema_version"] == SCHEMA_VERSION == 4
    assert (record["device"], record["precision"]) == ("cpu", "fp32")
    old = {k: v for k, v in record.items() if k not in ("device", "precision")} | {"schema_version": 2}
    new = record | {"device": "cuda:0 (NVIDIA H200)", "precision": "bf16", "method": "ties"}
    (tmp_path / f"{record['backbone']}.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    loaded = load_results(tmp_path)
    assert [(r.device, r.precision) for r in loaded] == [("cpu", "fp32"), ("cuda:0 (NVIDIA H200)", "bf16")]
    page = leaderboard_markdown(tmp_path)
    assert "_Evaluated on: cpu fp32; cuda:0 (NVIDIA H200) bf16._" in page and "| ties (bf16) " in page


@pytest.mark.parametrize("changes, field", [
    ({"precision": "fp8"}, "precision"),
    ({"device": ""}, "device"),
    ({"device": None}, "device"),
])
def test_bad_device_or_precision_is_refused(changes, field):
    result = dataclasses.replace(make_result(), **changes)
    with pytest.raises(RecordError, match=f"{field}: "):
        result.to_json()


def test_a_version_3_record_without_its_device_is_refused(tmp_path):
    record = {k: v for k, v in json.loads(make_result().to_json()).items() if k != "device"}
    (tmp_path / f"{record['backbone']}.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(RecordError, match="device: missing"):
        load_results(tmp_path)


# --- runs -----------------------------------------------------------------------------------


def test_bf16_on_the_cpu_is_recorded_and_close_to_fp32(tiny_bert):
    fp32 = run("task-arithmetic", "tiny-bert", results_dir=None)
    bf16 = run("task-arithmetic", "tiny-bert", results_dir=None, precision="bf16")
    assert (fp32.device, fp32.precision, bf16.device, bf16.precision) == ("cpu", "fp32", "cpu", "bf16")
    assert fp32.metrics.keys() == bf16.metrics.keys()
    # tiny-bert's test splits hold 96 examples: one example is about one point
    for task in fp32.metrics:
        assert math.isclose(fp32.metrics[task], bf16.metrics[task], abs_tol=0.035), task
    assert Result.from_dict(json.loads(bf16.to_json())).precision == "bf16"


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device this machine has: the CPU, and CUDA where there is a GPU."""
    return request.param


@pytest.mark.parametrize("method", ["pretrained", "task-arithmetic"])
def test_every_device_gives_the_cpu_numbers(tiny_bert, device, method):
    on_cpu = run(method, "tiny-bert", results_dir=None)
    here = run(method, "tiny-bert", results_dir=None, device=device)
    assert here.device.startswith(device) and here.precision == "fp32"
    for task, value in on_cpu.metrics.items():
        assert math.isclose(here.metrics[task], value, abs_tol=0.011), task  # at most one example of 96 apart


def test_the_device_check_runs_on_the_cpu_and_fails_clearly_without_a_gpu(tiny_bert, no_cuda, capsys):
    from benchmarks.device_check import main as device_check

    assert device_check(["--method", "pretrained", "--method", "t-switch"]) == 2  # default: cpu,cuda
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert device_check(["--devices", "cpu", "--method", "pretrained", "--method", "regmean"]) == 0
    out = capsys.readouterr().out
    assert "only the CPU was asked for" in out
    assert out.count("| cpu ") == 6  # two methods, three tasks, one device
