"""Start-up time of the command line: ``mergebench --help``, ``run --help`` and ``list``.

Each command runs in a fresh interpreter, ``--repeat`` times; the table gives the median
wall and CPU (user + system) seconds, and which heavy libraries the command imported
(one more run, through ``main`` in a probe). ``--help`` and ``run --help`` should import
neither torch nor any plugin; ``list`` loads every plugin (and so torch) but none of the
optional libraries a suite needs only to read its data.

    python benchmarks/startup.py --repeat 5 [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

COMMANDS = {"mergebench --help": ["--help"], "mergebench run --help": ["run", "--help"], "mergebench list": ["list"]}
HEAVY = ("torch", "transformers", "datasets", "PIL", "pycocotools", "matplotlib", "sklearn", "scipy", "ray",
         "open_clip", "timm", "huggingface_hub")
PROBE = """
import json, sys
from mergebench.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = set(json.loads({heavy!r}))
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & heavy)), file=sys.stderr)
"""


def timed(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``python -m mergebench.cli ARGS`` in a fresh interpreter."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergebench.cli", *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def heavy_imports(args: list[str]) -> list[str]:
    code = PROBE.format(heavy=json.dumps(HEAVY))
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stderr.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", type=Path, help="also write the table as markdown to this file")
    args = parser.parse_args(argv)

    rows = []
    for name, command in COMMANDS.items():
        runs = [timed(command) for _ in range(args.repeat)]
        rows.append([name, f"{statistics.median(w for w, _ in runs):.2f}", f"{statistics.median(c for _, c in runs):.2f}",
                     ", ".join(heavy_imports(command)) or "-"])
    text = tabulate(rows, headers=["command", "wall s (median)", "CPU s (median)", "heavy imports"],
                    tablefmt="github", disable_numparse=True)
    text = f"`python benchmarks/startup.py --repeat {args.repeat}`, {os.cpu_count()} CPU(s)\n\n{text}\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
