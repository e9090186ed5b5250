"""The README's one-file dynamic method runs as written, on the core blocks alone."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergebench.registry import METHODS
from mergebench.runner import run

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(after: str) -> str:
    """The first python code block after the heading ``after``."""
    text = README.read_text()
    section = text[text.index(after):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def toy_method(monkeypatch):
    METHODS.names()  # the built-in plugins first
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    namespace: dict = {}
    exec(compile(readme_block("### A dynamic method in one file"), str(README), "exec"), namespace)
    return namespace


def test_the_readme_dynamic_method_runs_and_is_charged_its_stored_parts(tiny_bert, toy_method, tmp_path):
    assert METHODS.get("fp16-switch").name == "fp16-switch"
    pretrained = run("pretrained", "tiny-bert", results_dir=None)
    toy = run("fp16-switch", "tiny-bert", hyperparameters={"alpha": 0.5}, results_dir=tmp_path)
    assert toy.dynamic and not toy.automatic and toy.hyperparameters == {"alpha": 0.5}
    assert toy.average > pretrained.average  # the task's own (pruned) vector helps on its task
    assert toy.extra_storage_bytes == sum(toy.diagnostics["artifact_bytes"].values()) > 0
    assert sorted(toy.diagnostics["artifact_bytes"]) == sorted(f"{t.name}.fp16" for t in tiny_bert.tasks)
    assert (tmp_path / "tiny-bert.jsonl").exists()
