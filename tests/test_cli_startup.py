"""Start-up of the command line: the parser (and so ``--help`` and ``run --help``) is built
without torch or any plugin, ``list`` loads the plugins without the libraries a suite needs
only to read its data, and the light constants the parser uses equal what they stand for.
Each import check runs in a fresh interpreter (this one has imported everything)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mergebench.cli import ANALYSIS_NAMES, main


def fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_building_the_parser_imports_neither_torch_nor_a_plugin():
    heavy = fresh_python(
        "import mergebench.cli, sys; mergebench.cli.build_parser(); print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch','transformers','datasets','matplotlib','pycocotools','ray')))")
    assert heavy == "[]"
    ours = fresh_python(
        "import json, mergebench.cli, sys; mergebench.cli.build_parser(); print(json.dumps(sorted(m for m in sys.modules "
        "if m.startswith(('mergebench.methods', 'mergebench.tasks', 'mergebench.analysis')))))")
    assert json.loads(ours) == []


def test_listing_the_plugins_imports_no_optional_data_library():
    loaded = fresh_python(
        "import contextlib, io, json, sys\n"
        "from mergebench.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['list']) == 0\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'datasets', 'pycocotools', 'matplotlib', 'ray', 'open_clip', 'timm'})))")
    assert json.loads(loaded) == []


def test_the_analyze_choices_are_the_registered_analyses():
    from mergebench.analysis import ANALYSES

    assert ANALYSIS_NAMES == tuple(ANALYSES)


def test_run_help_points_to_the_hyperparameter_tables(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "`mergebench list`" in out and "`mergebench list --method NAME`" in out


def test_list_method_prints_that_methods_hyperparameters(capsys):
    assert main(["list", "--method", "ties"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()[3:]]
    assert rows == [["ties", "keep"], ["ties", "scaling"], ["ties", "merge_func"]]
    assert main(["list", "--method", "pretrained"]) == 0
    assert capsys.readouterr().out.strip() == "pretrained: no hyperparameters"


def test_list_of_an_unknown_method_exits_2(capsys):
    assert main(["list", "--method", "tie"]) == 2
    assert capsys.readouterr().err.startswith("mergebench: error: unknown method 'tie'; valid methods: ")
