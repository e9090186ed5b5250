"""The mini suite's committed data: every split matches its manifest, the sizes and the
no-overlap rules hold (checked here with the test's own reading of the files), and a
rebuild from the installed Debian packages keeps the rules and, where the packages are
the recorded versions, gives the committed splits again."""
from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from mergebench.tasks import mini

DATA = Path(mini.__file__).resolve().parent / "data" / "mini-v2"
SPLITS = ("train", "validation", "test")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()]


def key(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text())


@pytest.fixture(scope="module")
def committed(manifest) -> dict[str, dict[str, list[dict]]]:
    return {task: {split: read(DATA / entry["splits"][split]["file"]) for split in SPLITS}
            for task, entry in manifest["tasks"].items()}


def test_manifest_pins_every_split(manifest):
    assert manifest["suite"] == "mini" and manifest["version"] == mini.SUITE_VERSION == 2
    assert list(manifest["tasks"]) == sorted(mini.MiniLM.task_names)
    files = {p.name for p in DATA.iterdir()}
    assert files == {"manifest.json"} | {f"{t}.{s}.jsonl.gz" for t in manifest["tasks"] for s in SPLITS}
    for task, entry in manifest["tasks"].items():
        for split in SPLITS:
            raw = gzip.decompress((DATA / entry["splits"][split]["file"]).read_bytes())
            assert hashlib.sha256(raw).hexdigest() == entry["splits"][split]["sha256"], (task, split)
            assert raw.count(b"\n") == entry["splits"][split]["examples"]
        assert entry["sources"], task
        for source in entry["sources"]:  # every source names its package, version and licence
            assert source["package"] and source["version"] and source["licence"], (task, source)


def test_sizes_and_balance(manifest, committed):
    for task, splits in committed.items():
        k = len(manifest["tasks"][task]["classes"])
        assert 5 <= k <= 8, task
        for split, at_least in (("test", 2000), ("validation", 500)):
            counts = Counter(row["label"] for row in splits[split])
            assert sum(counts.values()) >= at_least, (task, split)
            assert set(counts) == set(range(k)) and len(set(counts.values())) == 1, (task, split)  # balanced
        train = Counter(row["label"] for row in splits["train"])
        assert set(train) == set(range(k)) and min(train.values()) >= 100, task
        assert all(isinstance(row["text"], str) and row["text"].strip() == row["text"] != ""
                   for rows in splits.values() for row in rows)


def test_no_text_shared_between_tasks_splits_or_repeated(committed):
    owner: dict[str, tuple[str, str]] = {}
    clashes = []
    for task, splits in committed.items():
        for split, rows in splits.items():
            for row in rows:
                k = key(row["text"])
                if k in owner:
                    clashes.append((owner[k], (task, split), row["text"]))
                owner[k] = (task, split)
    assert clashes == []
    assert sum(len(rows) for splits in committed.values() for rows in splits.values()) == len(owner)


def test_the_backbone_reads_exactly_the_committed_rows(committed):
    backbone = mini.MiniLM(root=Path("/nonexistent"))
    for task, splits in committed.items():
        for split, rows in splits.items():
            assert backbone.examples(task, split) == tuple((row["text"], row["label"]) for row in rows)


# --------------------------------------------------------------------------- #
# a rebuild from the installed Debian packages

NEEDED = {
    "fortunes": Path("/usr/share/games/fortunes/computers"),
    "wordnet-base": Path("/usr/share/wordnet/data.noun"),
    "unicode-data": Path("/usr/share/unicode/UnicodeData.txt"),
    "bible-kjv": Path("/usr/bin/bible"),
    "wamerican": Path("/usr/share/dict/american-english"),
    "apt lists with English descriptions (apt-get update -o Acquire::Languages=en)":
        next(iter(sorted(Path("/var/lib/apt/lists").glob("*_i18n_Translation-en*"))), Path("/nonexistent")),
    "libc6-dev": Path("/var/lib/dpkg/info/libc6-dev:amd64.list"),
    "libjs-jquery": Path("/var/lib/dpkg/info/libjs-jquery.list"),
}
ABSENT = [name for name, path in NEEDED.items() if not path.exists()]


@pytest.mark.skipif(bool(ABSENT), reason=f"the mini suite's Debian sources are not installed: {', '.join(ABSENT)} "
                                         "(python -m mergebench.tasks.mini build --install installs them)")
def test_rebuild_from_the_installed_packages(tmp_path, manifest, committed):
    changes = mini.build(tmp_path, committed=DATA)
    rebuilt = json.loads((tmp_path / "manifest.json").read_text())
    built = {task: {split: read(tmp_path / f"{task}.{split}.jsonl.gz") for split in SPLITS}
             for task in rebuilt["tasks"]}
    keys = [key(row["text"]) for splits in built.values() for rows in splits.values() for row in rows]
    assert len(keys) == len(set(keys))  # nothing shared between tasks or splits, nothing repeated
    for task, splits in built.items():
        assert len(splits["test"]) >= 2000 and len(splits["validation"]) >= 500
    # where every source is the recorded version, the rebuild is the committed data
    for task, entry in rebuilt["tasks"].items():
        same_sources = entry["sources"] == manifest["tasks"][task]["sources"]
        same_splits = all(entry["splits"][s]["sha256"] == manifest["tasks"][task]["splits"][s]["sha256"]
                          for s in SPLITS)
        assert same_splits or not same_sources, f"{task}: same package versions, different data"
        assert same_splits == (not any(line.startswith(f"{task}/") for line in changes)), task
