"""SHA-256 of large files, remembered by (path, size, mtime_ns) so that verifying a
prepared backbone on every run costs one ``stat`` per file, not a re-read of gigabytes.

The hashes live in one JSON object, ``cache_dir()/file-hashes.json``, rewritten
atomically. It is only a cache: a corrupt file reads as empty, and an entry lost to a
concurrent writer is computed again. Like make and rsync, it assumes that a file whose
content changes gets a new size or modification time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mergebench.cache import cache_dir, write_json

CACHE_NAME = "file-hashes.json"
CHUNK_BYTES = 1 << 20


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # absent, unreadable or half-garbage: recompute
        return {}
    return data if isinstance(data, dict) else {}


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns]


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """The hex SHA-256 of a file's bytes, from the cache when its size and mtime are unchanged."""
    path = Path(path).resolve()
    key, before = str(path), path.stat()
    entry = _read_cache().get(key)
    if isinstance(entry, dict) and entry.get("stamp") == _stamp(before) and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = _digest(path)
    if _stamp(path.stat()) == _stamp(before):  # not rewritten while it was read
        kept = {name: entry for name, entry in _read_cache().items() if Path(name).exists()}  # forget deleted files
        try:
            write_json(cache_path(), {**kept, key: {"stamp": _stamp(before), "sha256": digest}})
        except OSError:  # a read-only cache only costs the next run a re-hash
            pass
    return digest
