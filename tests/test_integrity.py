"""Checkpoint integrity: the prepare manifest (size and SHA-256 of every prepared file),
its verification by the ModelPool and by runs, repairs by `prepare`, the hash cache, and
suites that name every missing dataset and checkpoint at once."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebench import filehash
from mergebench.errors import MissingResourceError
from mergebench.cli import main
from mergebench.manifest import MANIFEST_NAME, manifest_path, prepare_checkpoints, read_manifest
from mergebench.pool import CheckpointError, ModelPool
from mergebench.runner import run
from mergebench.tasks.tiny import TASKS, TinyBert
from tests._stub import StubBackbone, tensors

KEY = "model.encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def tiny(tiny_bert, tmp_path, monkeypatch) -> TinyBert:
    """A private copy of the session's prepared tiny-bert (in a cache of its own, so that
    runs find it by name), without a manifest, as an older version left it."""
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    backbone = TinyBert()
    shutil.copytree(tiny_bert.root, backbone.root, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    return backbone


@pytest.fixture
def prepared(tiny) -> TinyBert:
    prepare_checkpoints(tiny)
    return tiny


def flip_exponent_bit(path: Path, key: str = KEY) -> None:
    """Flip the lowest exponent bit of the first value of a float32 tensor in place: the
    value halves or doubles and stays finite, the file keeps its size."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    assert header[key]["dtype"] == "F32"
    offset = 8 + length + header[key]["data_offsets"][0]
    data[offset + 2] ^= 0x80  # little-endian float32: bit 7 of byte 2 is the exponent's lowest bit
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def count_hashing(monkeypatch) -> list[Path]:
    """The files hashed from now on (cache misses)."""
    hashed, digest = [], filehash._digest

    def counting(path):
        hashed.append(Path(path))
        return digest(path)

    monkeypatch.setattr(filehash, "_digest", counting)
    return hashed


# --- the manifest ------------------------------------------------------------------------------
def test_prepare_records_size_and_sha256_of_every_checkpoint(prepared):
    path = manifest_path(prepared)
    assert path == prepared.root / MANIFEST_NAME
    files = json.loads(path.read_text())["files"]
    assert sorted(files) == sorted(["pretrained.safetensors", *(f"{task}.safetensors" for task in TASKS)])
    for name, entry in files.items():
        content = (prepared.root / name).read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    with ModelPool(prepared) as pool:
        assert pool.manifest_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_backbone_without_manifest_has_no_manifest_hash(tmp_path):
    with ModelPool(StubBackbone(tmp_path, tensors(a=[1.0]), {"t1": tensors(a=[2.0])})) as pool:
        assert pool.manifest_sha256 is None


def test_a_backbone_without_a_root_keeps_its_manifest_in_the_cache(tmp_path, monkeypatch):
    class InPlace(StubBackbone):
        """Checkpoints read where a user keeps them: no folder of its own (no ``root``)."""

        def __init__(self, folder: Path, *args):
            super().__init__(folder, *args)
            self.folder = folder
            del self.root

        def pretrained_checkpoint(self):
            return self.folder / "pre.safetensors"

        def finetuned_checkpoint(self, task):
            return self.folder / f"{task}.safetensors"

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    backbone = InPlace(tmp_path / "models", tensors(a=[1.0]), {"t1": tensors(a=[2.0])})
    manifest = prepare_checkpoints(backbone)
    assert manifest.path.parent == tmp_path / "cache" / "manifests"
    assert manifest.path.name.startswith("stub-")
    flip_exponent_bit(tmp_path / "models" / "t1.safetensors", "a")
    with ModelPool(backbone) as pool, pytest.raises(CheckpointError, match=r"t1\.safetensors.*--force"):
        pool.task_vector("t1", "a")


def test_a_corrupt_manifest_is_refused_then_written_again_from_checked_files(prepared, capsys):
    path = manifest_path(prepared)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint-manifest\.json: not a valid checkpoint manifest.*tiny-bert"):
        ModelPool(prepared)
    prepare_checkpoints(prepared, repair=False)
    assert "checking every checkpoint" in capsys.readouterr().err
    with ModelPool(prepared) as pool:
        assert pool.manifest_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rewriting_the_same_manifest_keeps_its_hash(prepared):
    before = read_manifest(prepared)
    again = prepare_checkpoints(prepared)
    assert again.sha256 == before.sha256
    assert again.files == before.files


# --- corrupt checkpoints ------------------------------------------------------------------------
def test_flipped_exponent_bit_stops_the_run_naming_the_file_and_force(prepared, tmp_path):
    path = prepared.finetuned_checkpoint("markers-b")
    flip_exponent_bit(path)
    assert torch.isfinite(load_file(str(path))[KEY]).all()  # nothing but the hash can tell
    with ModelPool(prepared) as pool, pytest.raises(CheckpointError) as error:
        pool.task_vector("markers-b", KEY)
    assert str(path) in str(error.value) and "--force" in str(error.value)

    results = tmp_path / "results"
    with pytest.raises(CheckpointError) as error:
        run("task-arithmetic", "tiny-bert", results_dir=results)
    assert str(path) in str(error.value) and "--force" in str(error.value)
    assert not (results / "tiny-bert.jsonl").exists()


def test_prepare_rebuilds_a_corrupt_checkpoint_of_a_suite_that_fine_tunes_locally(prepared, capsys):
    path = prepared.finetuned_checkpoint("markers-a")
    flip_exponent_bit(path)
    assert main(["prepare", "--backbone", "tiny-bert"]) == 0
    captured = capsys.readouterr()
    assert "ready" in captured.out and f"{path} has SHA-256" in captured.err and "rebuilding it" in captured.err
    with ModelPool(prepared) as pool:
        assert torch.isfinite(pool.task_vector("markers-a", KEY)).all()


def test_truncated_checkpoint_without_manifest_is_rebuilt(tiny, capsys):
    path = tiny.finetuned_checkpoint("markers-c")
    truncate(path)
    assert main(["prepare", "--backbone", "tiny-bert"]) == 0
    assert f"cannot read checkpoint {path}" in capsys.readouterr().err
    assert read_manifest(tiny).entry(path).size == path.stat().st_size
    load_file(str(path))  # readable again


def test_a_suite_that_cannot_rebuild_names_the_truncated_file_and_force(prepared, monkeypatch, capsys):
    monkeypatch.setattr(TinyBert, "rebuilds_checkpoints", False)  # as the converting suites (glue, vision-8, rf100)
    path = prepared.finetuned_checkpoint("markers-c")
    truncate(path)
    size = path.stat().st_size
    assert main(["prepare", "--backbone", "tiny-bert"]) == 2
    captured = capsys.readouterr()
    assert "ready" not in captured.out
    assert f"{path} is {size} bytes" in captured.err
    assert "mergebench prepare --backbone tiny-bert --force" in captured.err
    assert path.stat().st_size == size  # left for the user to see


def test_nan_in_the_pretrained_checkpoint_is_refused(tiny, tmp_path):
    pretrained = tiny.pretrained_checkpoint()
    state = load_file(str(pretrained))
    state[KEY][0, 0] = float("nan")
    save_file(state, str(pretrained))
    results = tmp_path / "results"
    with pytest.raises(CheckpointError, match=rf"{pretrained}: tensor '{KEY}' has NaN.*--force"):
        run("task-arithmetic", "tiny-bert", results_dir=results)
    assert not (results / "tiny-bert.jsonl").exists()
    assert read_manifest(tiny) is None  # nothing recorded as good either

    stub = StubBackbone(tmp_path, tensors(a=[1.0, float("nan")]), {"t1": tensors(a=[2.0, 3.0])})
    with pytest.raises(CheckpointError, match=r"pre\.safetensors: tensor 'a' has NaN"):
        ModelPool(stub)


def test_prepare_rebuilds_a_pretrained_checkpoint_with_nan(tiny, capsys):
    pretrained = tiny.pretrained_checkpoint()
    state = load_file(str(pretrained))
    state[KEY][0, 0] = float("inf")
    save_file(state, str(pretrained))
    assert main(["prepare", "--backbone", "tiny-bert"]) == 0
    assert f"{pretrained}: tensor '{KEY}' has NaN or infinite values; rebuilding it" in capsys.readouterr().err
    assert torch.isfinite(load_file(str(pretrained))[KEY]).all()


# --- the hash cache -------------------------------------------------------------------------------
def test_warm_verification_does_not_hash_again(prepared, monkeypatch):
    hashed = count_hashing(monkeypatch)
    prepare_checkpoints(prepared, repair=False)  # what every run does first
    with ModelPool(prepared) as pool:
        for task in TASKS:
            pool.task_vector(task, KEY)
    assert hashed == []

    filehash.cache_path().write_text('{"truncated": ')  # a corrupt cache is recomputed, not fatal
    with ModelPool(prepared) as pool:
        pool.task_vector("markers-a", KEY)
    assert sorted(p.name for p in hashed) == ["markers-a.safetensors", "pretrained.safetensors"]
    assert str(prepared.finetuned_checkpoint("markers-a").resolve()) in json.loads(filehash.cache_path().read_text())


def test_a_changed_modification_time_means_hashing_again(prepared, monkeypatch):
    import os

    path = prepared.finetuned_checkpoint("markers-b")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    hashed = count_hashing(monkeypatch)
    with ModelPool(prepared) as pool:
        pool.task_vector("markers-b", KEY)  # same bytes: verified
    assert [p.name for p in hashed] == ["markers-b.safetensors"]


# --- everything missing, named at once -------------------------------------------------------------
def test_glue_names_every_missing_dataset_and_checkpoint_at_once(tmp_path, monkeypatch):
    from mergebench.tasks.glue import RobertaBase
    from mergebench.tasks._glue_data import GLUE_TASKS

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(MissingResourceError) as error:
        RobertaBase(checkpoint_dir=tmp_path / "checkpoints", data_dir=tmp_path / "data").prepare()
    message = str(error.value)
    assert "17 datasets or checkpoints are missing" in message
    for task in GLUE_TASKS:
        assert f"the GLUE {task} folder {tmp_path / 'data' / task}" in message
        assert f"the roberta-base checkpoint fine-tuned on GLUE {task}" in message
    assert "FacebookAI/roberta-base" in message and "HF_HUB_OFFLINE" in message
    assert message.count("The data directory needs one folder per task") == 1  # the hint once


def test_rf100_names_missing_data_and_checkpoints_at_once(tmp_path, monkeypatch):
    from mergebench.tasks.rf100 import DEFAULT_DATASETS, DOMAINS, RF100Detr

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(MissingResourceError) as error:
        RF100Detr(checkpoint_dir=tmp_path / "checkpoints", data_dir=tmp_path / "data").prepare()
    message = str(error.value)
    for domain in DOMAINS:
        for split in ("train", "test"):
            assert str(tmp_path / "data" / DEFAULT_DATASETS[domain] / split / "_annotations.coco.json") in message
        assert f"{tmp_path / 'checkpoints' / domain} (no folder)" in message
