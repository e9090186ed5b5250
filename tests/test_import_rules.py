"""The import rules of DESIGN.md, read from the source with ``ast``: the core never imports a
plugin; a method imports only the core and third-party packages (never another method nor a
suite); a suite imports only the core, third-party packages and the suites' private helpers
(``mergebench.tasks._*``). A part two plugins need lives in the core."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mergebench": ROOT / "mergebench", "mergebench.methods": ROOT / "methods", "mergebench.tasks": ROOT / "tasks"}


def modules(package: str) -> list[tuple[str, Path]]:
    """(module name, file) of every module under a package folder; the core's own folder only."""
    folder = PACKAGES[package]
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if package == "mergebench" and parts[0] in ("methods", "tasks"):  # a link to a plugin folder is not core
            continue
        found.append((".".join((package, *parts)).removesuffix(".__init__"), path))
    assert found, f"no modules under {folder}"
    return found


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, name) of everything a module imports, relative imports made absolute; ``from P
    import x`` yields ``P.x``, which is the module ``P.x`` where x is one."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(package: str, allowed) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for module, path in modules(package) for line, name in imports(module, path)
            if within(name, "mergebench") and not allowed(module, name)]


def is_core(name: str) -> bool:
    return not within(name, "mergebench.methods") and not within(name, "mergebench.tasks")


def test_the_core_never_imports_a_plugin():
    assert violations("mergebench", lambda module, name: is_core(name)) == []


def test_a_method_imports_only_the_core():
    assert violations("mergebench.methods", lambda module, name: is_core(name)) == []


def test_a_suite_imports_only_the_core_and_the_suites_private_helpers():
    def allowed(module: str, name: str) -> bool:
        return is_core(name) or name.startswith("mergebench.tasks._")

    assert violations("mergebench.tasks", allowed) == []


@pytest.mark.parametrize("source, module, expected", [
    ("from mergebench.methods.t_switch import pulse_mask", "mergebench.analysis.sass", "mergebench.methods.t_switch.pulse_mask"),
    ("from .t_switch import TSwitch", "mergebench.methods.flexswitch", "mergebench.methods.t_switch.TSwitch"),
    ("from . import _hub", "mergebench.tasks.vision8", "mergebench.tasks._hub"),
    ("from ..methods import ties", "mergebench.analysis.report", "mergebench.methods.ties"),
    ("import mergebench.tasks.glue", "mergebench.cli", "mergebench.tasks.glue"),
])
def test_imports_are_read_with_relative_ones_made_absolute(tmp_path, source, module, expected):
    path = tmp_path / "module.py"
    path.write_text(f"def f():\n    {source}\n")  # also inside a function
    assert [name for _, name in imports(module, path)] == [expected]
