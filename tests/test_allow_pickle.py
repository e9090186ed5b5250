"""`prepare --allow-pickle`: open_clip checkpoints released as pickled modules are unpickled
only on that opt-in, with a warning, once (their tensors kept as safetensors in the cache);
without it nothing is unpickled and the refusal says what to do. Tested on tiny pickled
modules written here, whose unpickling leaves a mark."""
from __future__ import annotations

import hashlib
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mergebench.cli import main
from mergebench.pool import CheckpointError
from mergebench.tasks import _clip
from tests.test_vision8 import TASKS, files, hub_isolation, open_clip_backbone, to_open_clip  # noqa: F401 (fixtures)

UNPICKLED: list[str] = []  # one entry per unpickling of a Mark


def _mark(name: str) -> "Mark":
    UNPICKLED.append(name)
    return Mark(name)


class Mark:
    """An object whose unpickling runs code: it records that it happened."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return _mark, (self.name,)


class ImageEncoder(nn.Module):
    """Stands for task_vectors' ImageEncoder: a module pickled whole, its tensors at the given keys."""

    def __init__(self, state: dict[str, torch.Tensor], name: str = "encoder"):
        super().__init__()
        self.mark = Mark(name)
        for key, value in state.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, value.clone())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    UNPICKLED.clear()
    return tmp_path / "cache"


def test_without_the_flag_nothing_is_unpickled_and_the_refusal_names_it(tmp_path, cache):
    torch.save(ImageEncoder({"model.visual.proj": torch.ones(3, 2)}), tmp_path / "finetuned.pt")
    with pytest.raises(CheckpointError, match=r"(?s)not a plain state dict.*never unpickles.*--allow-pickle"):
        _clip.read_state_dict(tmp_path / "finetuned.pt")
    assert UNPICKLED == [] and not cache.exists()


def test_with_the_flag_the_module_is_unpickled_once_with_a_warning(tmp_path, cache):
    state = {"model.visual.proj": torch.randn(4, 3), "model.visual.ln_post.weight": torch.randn(4),
             "model.logit_scale": torch.tensor(4.6)}
    path = tmp_path / "finetuned.pt"
    torch.save(ImageEncoder(state, "first"), path)
    with pytest.warns(UserWarning, match=r"unpickling .*finetuned.pt, which runs code from the file"):
        loaded = _clip.read_state_dict(path, allow_pickle=True)
    assert UNPICKLED == ["first"]
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    kept = cache / "unpickled" / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.safetensors"
    assert all(torch.equal(load_file(str(kept))[k], v) for k, v in state.items())
    again = _clip.read_state_dict(path, allow_pickle=True)  # from the cache: no second unpickling, no warning
    assert UNPICKLED == ["first"] and all(torch.equal(again[k], v) for k, v in state.items())


def test_a_class_that_cannot_be_imported_is_named(tmp_path, cache, monkeypatch):
    module_dir = tmp_path / "code"
    module_dir.mkdir()
    (module_dir / "absent_modeling.py").write_text(
        "import torch\nclass Encoder(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.proj = torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(module_dir))
    import absent_modeling

    torch.save(absent_modeling.Encoder(), tmp_path / "finetuned.pt")
    monkeypatch.delitem(sys.modules, "absent_modeling")
    shutil.rmtree(module_dir)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"needs the module 'absent_modeling'.*open_clip_torch"):
        _clip.read_state_dict(tmp_path / "finetuned.pt", allow_pickle=True)


def test_prepare_converts_a_pickled_open_clip_checkpoint_only_with_the_flag(files, open_clip_backbone, tmp_path,  # noqa: F811
                                                                          capsys):
    UNPICKLED.clear()  # the session's cache, where the reference backbone was prepared
    checkpoints = tmp_path / "open_clip"
    shutil.copytree(files["open_clip"], checkpoints)
    mnist = checkpoints / "ViT-B-32" / "MNIST" / "finetuned.pt"
    state = torch.load(mnist, weights_only=True)
    torch.save(ImageEncoder(state, "mnist"), mnist)  # the same tensors, pickled as a module
    command = ["prepare", "--backbone", "clip-tiny-test", "--checkpoint-dir", str(checkpoints),
               "--data-dir", str(files["data"])]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "MNIST/finetuned.pt is not a plain state dict" in err and "--allow-pickle" in err and UNPICKLED == []
    with pytest.warns(UserWarning, match="runs code from the file"):
        assert main([*command, "--allow-pickle"]) == 0
    assert UNPICKLED == ["mnist"]
    prepared = type(open_clip_backbone)(checkpoint_dir=checkpoints, data_dir=files["data"])
    for task in TASKS:  # the same encoders as from the plain state dicts
        ours, reference = (load_file(str(b.root / f"{task}.safetensors")) for b in (prepared, open_clip_backbone))
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_the_flag_is_refused_where_no_checkpoint_is_pickled(capsys):
    assert main(["prepare", "--backbone", "tiny-bert", "--allow-pickle"]) == 2
    assert "--allow-pickle: tiny-bert reads no pickled checkpoints" in capsys.readouterr().err
