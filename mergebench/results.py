"""Result records: one JSON line per run in ``results/<backbone>.jsonl``.

Appending rewrites the file through a temporary file and an atomic rename, so a
crash at any moment leaves either the old file or the new one, never half a record.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergebench.cache import write_bytes


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
    checkpoint_family: str | None = None  # Backbone.checkpoint_family, where a backbone reads several
    diagnostics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))  # insertion order keeps the suite's task order

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def results_file(results_dir: Path, backbone: str) -> Path:
    return Path(results_dir) / f"{backbone}.jsonl"


def append_result(results_dir: Path, result: Result) -> Path:
    """Append one record atomically (the file is rewritten through a temp file and a rename)."""
    path = results_file(results_dir, result.backbone)
    existing = path.read_bytes() if path.exists() else b""
    if existing and not existing.endswith(b"\n"):
        existing += b"\n"
    return write_bytes(path, existing + result.to_json().encode() + b"\n")


def load_results(results_dir: Path) -> list[Result]:
    """Every record under ``results_dir``; a malformed line is an error naming file and line."""
    results = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise TypeError(f"a JSON {type(record).__name__}, not an object")
                results.append(Result.from_dict(record))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a valid result record ({error})") from error
    return results
