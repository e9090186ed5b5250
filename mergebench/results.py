"""Result records: one JSON line per run in ``results/<backbone>.jsonl``.

Appending rewrites the file through a temporary file and an atomic rename, so a
crash at any moment leaves either the old file or the new one, never half a record.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    method: str
    backbone: str
    suite: str
    seed: int
    hyperparameters: dict[str, Any]
    metrics: dict[str, float]
    average: float
    extra_storage_bytes: int
    merge_seconds: float
    eval_seconds: float
    peak_rss_bytes: int
    exemplars_per_task: int = 0
    automatic: bool = True
    dynamic: bool = False
    uses_test_inputs: bool = False
    reference: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def results_file(results_dir: Path, backbone: str) -> Path:
    return Path(results_dir) / f"{backbone}.jsonl"


def append_result(results_dir: Path, result: Result) -> Path:
    """Append one record atomically (temp file in the same directory, then rename)."""
    path = results_file(results_dir, result.backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_bytes() if path.exists() else b""
    if existing and not existing.endswith(b"\n"):
        existing += b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(existing + result.to_json().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_results(results_dir: Path) -> list[Result]:
    """Every record under ``results_dir``; a malformed line is an error naming file and line."""
    results = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                results.append(Result.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a valid result record ({error})") from error
    return results
