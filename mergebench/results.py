"""Result records: one strict JSON line per run in ``results/<backbone>.jsonl``.

A record is checked when it is written and when it is read (types, finite numbers,
metrics in range, an average that is the mean of the metrics, the backbone of its file),
so a table never shows a number nothing vouches for. Appending is one ``O_APPEND`` write
of the whole line under an exclusive lock: concurrent runs never lose or interleave
records, and a crash leaves at worst one partial last line, which the next writer
steps over and the reader names by file and line.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping

from mergebench.cache import cache_dir
from mergebench.errors import RecordError, ResultsWriteError

PRECISIONS = ("fp32", "bf16", "fp16")  # as mergebench.device names them (not imported: records load without torch)

SCHEMA_VERSION = 4  # 1: records written before schema_version, training_seconds, reused and checkpoint_manifest
# fields a record of each older version lacks (a version-2 record ran on the CPU in float32; one
# before version 4 names no protocol, and the leaderboard says so rather than guess one)
_ADDED_IN = {3: ("device", "precision"), 4: ("protocol", "overrides", "examples", "batch_size")}
NO_PROTOCOL = "(no protocol recorded)"  # how a record that names no protocol is shown


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
    schema_version: int = SCHEMA_VERSION
    # the full cost of learning the merge: merge_seconds, plus the original training time
    # when the method reused a cached training (None here means merge_seconds)
    training_seconds: float | None = None
    reused: bool = False
    checkpoint_manifest: str | None = None  # SHA-256 of the checkpoint manifest the run verified
    device: str = "cpu"  # where evaluation ran, e.g. "cuda:0 (NVIDIA H200)"
    precision: str = "fp32"  # evaluation's autocast precision
    # how the hyperparameters were chosen, if tuned: {"on": "validation", "size", "seed", "grid",
    # "validation_average", "points"} (mergebench.selection); null when untuned, and records written before it may lack it
    selection: dict[str, Any] | None = None
    # the named setting the run resolved its hyperparameters and evaluation under
    # (mergebench.protocols); null in a record written before protocols, never guessed
    protocol: str | None = None
    overrides: list[str] = field(default_factory=list)  # hyperparameters set explicitly over the protocol
    examples: dict[str, int] | None = None  # task -> test examples scored (null in records before version 4)
    batch_size: int | None = None  # the evaluation batch (per-batch routing averages over it); null: not recorded
    # the seeded bootstrap 95 % interval over test examples (mergebench.bootstrap.suite_interval):
    # {"method", "level", "resamples", "seed", "average": [lo, hi] | null, "tasks": {task: [lo, hi] | null}};
    # null in records written before it
    interval: dict[str, Any] | None = None
    # SHA-256 of the manifest pinning the evaluation data, for suites that ship their data (mini):
    # rows scored on different data are never ranked together; null where the data is not pinned
    data_manifest: str | None = None

    def __post_init__(self) -> None:
        if self.training_seconds is None:
            self.training_seconds = self.merge_seconds

    def to_json(self) -> str:
        """The strict JSON line (no NaN or Infinity); a bad record raises RecordError."""
        data = asdict(self)  # insertion order keeps the suite's task order
        try:
            check_record(data)
        except RecordError as error:
            raise RecordError(f"result of {self.method!r} on {self.backbone!r}: {error}") from None
        return json.dumps(data, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Result":
        """A record as stored; one from before schema version 2 gets its reuse and full
        training cost from its diagnostics, where a reused training kept its seconds."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "schema_version" not in data:
            values["schema_version"] = 1
            reused_seconds = _reused_training_seconds(values.get("diagnostics") or {})
            values.setdefault("reused", reused_seconds is not None)
            values.setdefault("training_seconds", values["merge_seconds"] + (reused_seconds or 0.0))
        return cls(**values)


def _reused_training_seconds(diagnostics: Any) -> float | None:
    """The summed ``seconds`` of every diagnostics entry marked ``reused: true`` (None: none)."""
    found = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("reused") is True and _is_number(value.get("seconds")):
                found.append(float(value["seconds"]))
            for item in value.values():
                walk(item)

    walk(diagnostics)
    return math.fsum(found) if found else None


# --- validation ---------------------------------------------------------------------------

_REQUIRED = ("method", "backbone", "suite", "seed", "hyperparameters", "metrics", "average",
             "extra_storage_bytes", "merge_seconds", "eval_seconds", "peak_rss_bytes")
_NON_NEGATIVE_INTS = ("extra_storage_bytes", "peak_rss_bytes", "exemplars_per_task")
_NON_NEGATIVE_FLOATS = ("merge_seconds", "eval_seconds", "training_seconds")
_BOOLS = ("automatic", "dynamic", "uses_test_inputs", "reference", "reused")
_OPTIONAL_STRINGS = ("checkpoint_family", "git_commit")
_OPTIONAL = ("selection", "data_manifest", "interval")  # fields a record of any version may leave out
_RELATIVE_TOLERANCE = 1e-9


def _check_selection(selection: Any) -> None:
    if not isinstance(selection, dict):
        _fail("selection", f"a JSON {type(selection).__name__}, not an object or null")
    if selection.get("on") != "validation":
        _fail("selection.on", f"{selection.get('on')!r} is not 'validation'")
    for name in ("size", "seed"):
        if not _is_int(selection.get(name)) or selection[name] < 0:
            _fail(f"selection.{name}", f"{selection.get(name)!r} is not a non-negative integer")
    if not isinstance(selection.get("grid"), dict):
        _fail("selection.grid", f"{selection.get('grid')!r} is not an object of key: values")
    if not _is_number(selection.get("validation_average")):
        _fail("selection.validation_average", f"{selection.get('validation_average')!r} is not a number")
    # which examples selection scored: a split carved from training, or the suite's shipped
    # validation split (records before the choice existed carved theirs and name none)
    if selection.get("split", "train") not in ("train", "validation"):
        _fail("selection.split", f"{selection.get('split')!r} is not 'train' or 'validation'")
    sizes = selection.get("sizes")
    if sizes is not None and not (isinstance(sizes, dict) and all(_is_int(n) and n > 0 for n in sizes.values())):
        _fail("selection.sizes", f"{sizes!r} is not an object of task: positive example count")


def _check_protocol_fields(data: Mapping[str, Any]) -> None:
    """protocol: a name or null; overrides: distinct names of recorded hyperparameters; examples:
    a positive count for exactly the tasks of ``metrics``, or null."""
    protocol = data.get("protocol")
    if protocol is not None and (not isinstance(protocol, str) or not protocol):
        _fail("protocol", f"{protocol!r} is not a non-empty string or null")
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(name, str) for name in overrides):
        _fail("overrides", f"{overrides!r} is not a list of hyperparameter names")
    if len(set(overrides)) != len(overrides):
        _fail("overrides", f"{overrides!r} names a hyperparameter twice")
    unknown = [name for name in overrides if name not in data["hyperparameters"]]
    if unknown:
        _fail("overrides", f"{', '.join(unknown)} not among the recorded hyperparameters")
    batch_size = data.get("batch_size")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        _fail("batch_size", f"{batch_size!r} is not a positive integer or null")
    examples = data.get("examples")
    if examples is None:
        return
    if not isinstance(examples, dict) or list(examples) != list(data["metrics"]):
        _fail("examples", f"{examples!r} is not an object of the metrics' tasks, in their order")
    for task, count in examples.items():
        if not _is_int(count) or count < 1:
            _fail(f"examples.{task}", f"{count!r} is not a positive integer")


def _check_bounds(bounds: Any, estimate: float, name: str) -> None:
    """[lo, hi]: finite numbers in [-1, 1] around ``estimate``, or null."""
    if bounds is None:
        return
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(v) for v in bounds)):
        _fail(name, f"{bounds!r} is not [low, high] or null")
    low, high = bounds
    if not -1.0 <= low <= estimate <= high <= 1.0:
        _fail(name, f"{bounds!r} is not an interval within [-1, 1] around its estimate {estimate!r}")


def _check_interval(data: Mapping[str, Any]) -> None:
    """interval: null, or the bootstrap's level, resamples, seed and [lo, hi] bounds of the
    average and of exactly the metrics' tasks, each around its recorded value."""
    interval = data.get("interval")
    if interval is None:
        return
    if not isinstance(interval, dict):
        _fail("interval", f"a JSON {type(interval).__name__}, not an object or null")
    if not isinstance(interval.get("method"), str):
        _fail("interval.method", f"{interval.get('method')!r} is not a string")
    level = interval.get("level")
    if not _is_number(level) or not 0 < level < 1:
        _fail("interval.level", f"{level!r} is not a number between 0 and 1")
    if not _is_int(interval.get("resamples")) or interval["resamples"] < 1:
        _fail("interval.resamples", f"{interval.get('resamples')!r} is not a positive integer")
    if not _is_int(interval.get("seed")):
        _fail("interval.seed", f"{interval.get('seed')!r} is not an integer")
    _check_bounds(interval.get("average"), data["average"], "interval.average")
    tasks = interval.get("tasks")
    if not isinstance(tasks, dict) or list(tasks) != list(data["metrics"]):
        _fail("interval.tasks", f"{tasks!r} is not an object of the metrics' tasks, in their order")
    for task, bounds in tasks.items():
        _check_bounds(bounds, data["metrics"][task], f"interval.tasks.{task}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, reason: str) -> None:
    raise RecordError(f"{name}: {reason}")


def _check_json_value(value: Any, name: str) -> None:
    """Only what strict JSON holds: every float finite, every key a string."""
    if isinstance(value, float):
        if not math.isfinite(value):
            spelled = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            _fail(name, f"{spelled} is not a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                _fail(name, f"key {key!r} is not a string")
            _check_json_value(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(item, f"{name}[{index}]")
    elif not (value is None or isinstance(value, (str, int))):
        _fail(name, f"a {type(value).__name__} is not a JSON value")


def check_record(data: Mapping[str, Any]) -> None:
    """Raise RecordError('field: reason') for the first thing wrong with a record."""
    version = data.get("schema_version", 1)
    if not _is_int(version) or not 1 <= version <= SCHEMA_VERSION:
        _fail("schema_version", f"{version!r} is not a schema version this mergebench reads (1 to {SCHEMA_VERSION}); "
                                "a newer one needs a newer mergebench")
    newer = {name for added, names in _ADDED_IN.items() if added > version for name in names}
    required = [f.name for f in fields(Result) if f.name not in newer and f.name not in _OPTIONAL] \
        if version >= 2 else _REQUIRED
    for name in required:
        if name not in data:
            _fail(name, "missing")
    for name, value in data.items():
        _check_json_value(value, name)

    for name in ("method", "backbone", "suite"):
        if not isinstance(data[name], str) or not data[name]:
            _fail(name, f"{data[name]!r} is not a non-empty string")
    if not _is_int(data["seed"]):
        _fail("seed", f"{data['seed']!r} is not an integer")
    for name in ("hyperparameters", "diagnostics", "versions"):
        if name in data and not isinstance(data[name], dict):
            _fail(name, f"a JSON {type(data[name]).__name__}, not an object")
    for key, value in data.get("versions", {}).items():
        if not isinstance(value, str):
            _fail(f"versions.{key}", f"{value!r} is not a string")
    for name in _BOOLS:
        if name in data and not isinstance(data[name], bool):
            _fail(name, f"{data[name]!r} is not true or false")
    for name in _OPTIONAL_STRINGS:
        if data.get(name) is not None and not isinstance(data[name], str):
            _fail(name, f"{data[name]!r} is not a string or null")
    for name in _NON_NEGATIVE_INTS:
        if name in data and (not _is_int(data[name]) or data[name] < 0):
            _fail(name, f"{data[name]!r} is not a non-negative integer")
    for name in _NON_NEGATIVE_FLOATS:
        if name in data and (not _is_number(data[name]) or data[name] < 0):
            _fail(name, f"{data[name]!r} is not a non-negative number")

    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        _fail("metrics", "not a non-empty object of task: value")
    for task, value in metrics.items():
        if not _is_number(value):
            _fail(f"metrics.{task}", f"{value!r} is not a number")
        if not -1.0 <= value <= 1.0:  # accuracy and mAP in [0, 1]; Matthews, Pearson, Spearman in [-1, 1]
            _fail(f"metrics.{task}", f"{value} is outside [-1, 1] (metrics are fractions, not percentages)")
    average = data["average"]
    mean = math.fsum(metrics.values()) / len(metrics)
    if not _is_number(average) or not math.isclose(average, mean, rel_tol=_RELATIVE_TOLERANCE, abs_tol=1e-12):
        _fail("average", f"{average!r} is not the mean of the metrics ({mean!r})")

    if "training_seconds" in data:
        training, merge = data["training_seconds"], data["merge_seconds"]
        if data.get("reused"):
            if training < merge * (1 - _RELATIVE_TOLERANCE):
                _fail("training_seconds", f"{training} is less than merge_seconds ({merge}), "
                                          "yet it includes them with the reused training")
        elif not math.isclose(training, merge, rel_tol=_RELATIVE_TOLERANCE, abs_tol=1e-12):
            _fail("training_seconds", f"{training} differs from merge_seconds ({merge}) though nothing was reused")
    if data.get("selection") is not None:
        _check_selection(data["selection"])
    _check_protocol_fields(data)
    _check_interval(data)
    if not isinstance(data.get("device", "cpu"), str) or not data.get("device", "cpu"):
        _fail("device", f"{data['device']!r} is not a non-empty string")
    if data.get("precision", "fp32") not in PRECISIONS:
        _fail("precision", f"{data['precision']!r} is not one of {', '.join(PRECISIONS)}")
    for name in ("checkpoint_manifest", "data_manifest"):
        manifest = data.get(name)
        if manifest is not None and not (isinstance(manifest, str) and re.fullmatch(r"[0-9a-f]{64}", manifest)):
            _fail(name, f"{manifest!r} is not a SHA-256 hex digest")
    created = data.get("created", "")
    if not isinstance(created, str):
        _fail("created", f"{created!r} is not a string")
    if created:
        try:
            datetime.fromisoformat(created)
        except ValueError:
            _fail("created", f"{created!r} is not an ISO 8601 time")


# --- writing --------------------------------------------------------------------------------


def results_file(results_dir: Path, backbone: str) -> Path:
    return Path(results_dir) / f"{backbone}.jsonl"


def _remove_leftover_temporaries(results_dir: Path, pattern: str = ".*.jsonl.*.tmp") -> None:
    """Temporary files the former rename-based writer left when it was killed."""
    for leftover in Path(results_dir).glob(pattern):
        leftover.unlink(missing_ok=True)


def check_writable(results_dir: Path) -> Path:
    """Write a probe file in ``results_dir`` before any work starts, so a read-only or full
    location fails now rather than after an evaluation; raise ResultsWriteError naming the
    path. Folders it had to create are removed again: a run that fails later leaves nothing."""
    results_dir = Path(results_dir)
    created = [folder for folder in (results_dir, *results_dir.parents) if not folder.exists()]
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=results_dir, prefix=".write-test.")
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        for existing in results_dir.glob("*.jsonl"):
            os.close(os.open(existing, os.O_RDWR | os.O_APPEND))  # as append_result opens it
        _remove_leftover_temporaries(results_dir)
    except OSError as error:
        where = error.filename if str(error.filename).endswith(".jsonl") else results_dir  # not the probe's name
        raise ResultsWriteError(f"cannot write results to {where}: {error.strerror or error}") from error
    for folder in created:  # innermost first; one a concurrent run has written to stays
        try:
            folder.rmdir()
        except OSError:
            break
    return results_dir


def _append_line(path: Path, line: bytes) -> None:
    """One ``O_APPEND`` write of ``line`` under an exclusive lock, then fsync. A file whose
    last line a crashed writer left unfinished gets a newline first; a failed write is
    cut back off, so the file never keeps half a record of ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: the last byte
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)  # releases the lock


def _save_for_recovery(backbone: str, line: bytes) -> Path | None:
    """Where a record that could not be appended is kept, so no evaluation is lost."""
    for folder in (cache_dir() / "unsaved-results", Path(tempfile.gettempdir()) / "mergebench-unsaved-results"):
        try:
            _append_line(folder / f"{backbone}.jsonl", line)
            return folder / f"{backbone}.jsonl"
        except OSError:
            continue
    return None


def append_result(results_dir: Path, result: Result) -> Path:
    """Append one checked record to ``results/<backbone>.jsonl``, safe against concurrent
    writers. If the file cannot be written the record goes to a recovery file and
    ResultsWriteError names both."""
    line = result.to_json().encode() + b"\n"  # a bad record raises here, before anything is written
    path = results_file(results_dir, result.backbone)
    try:
        _append_line(path, line)
    except OSError as error:
        reason = error.strerror or str(error)
        recovery = _save_for_recovery(result.backbone, line)
        if recovery is None:
            raise ResultsWriteError(f"cannot append the result to {path} ({reason}) and no recovery file could be "
                                    f"written either; the record is: {line.decode().strip()}") from error
        raise ResultsWriteError(f"cannot append the result to {path} ({reason}); the record was saved to "
                                f"{recovery}: append its lines to {path} once that can be written") from error
    _remove_leftover_temporaries(path.parent, f".{path.name}.*.tmp")
    return path


# --- reading --------------------------------------------------------------------------------


def iter_records(results_dir: Path) -> Iterator[tuple[str, Result]]:
    """``("file:line", record)`` for every record under ``results_dir``, in file and append
    order; anything malformed raises RecordError naming file, line and field."""
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        yield from _iter_file(path)


def _iter_file(path: Path) -> Iterator[tuple[str, Result]]:
    """``iter_records`` of one ``<backbone>.jsonl`` file."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RecordError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                              f"{error.start + 1})") from None
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecordError(f"{where}: not a valid result record ({error})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{where}: not a valid result record (a JSON {type(data).__name__}, not an object)")
        try:
            check_record(data)
            if data["backbone"] != path.stem:
                _fail("backbone", f"{data['backbone']!r} does not belong in {path.name} "
                                  f"(records of a backbone sit in {data['backbone']}.jsonl)")
        except RecordError as error:
            raise RecordError(f"{where}: {error}") from None
        yield where, Result.from_dict(data)


def load_results(results_dir: Path) -> list[Result]:
    """Every record under ``results_dir``; a malformed one is an error naming file, line and field."""
    return [result for _, result in iter_records(results_dir)]


# --- as a table of data ---------------------------------------------------------------------

# the record's own fields, in the frame's column order (metrics, hyperparameters, examples and
# versions are flattened around them; diagnostics, free-form and nested, are left out)
_FRAME_FIELDS = ("method", "backbone", "suite", "checkpoint_family", "protocol", "overrides", "seed",
                 "average", "extra_storage_bytes", "merge_seconds", "training_seconds", "reused", "eval_seconds",
                 "peak_rss_bytes", "exemplars_per_task", "uses_test_inputs", "automatic", "dynamic", "reference",
                 "device", "precision", "batch_size", "selection", "created", "git_commit", "checkpoint_manifest",
                 "data_manifest", "schema_version")


def _frame_row(result: Result) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(result, name) for name in _FRAME_FIELDS}
    row["overrides"] = ",".join(result.overrides or ())  # a plain cell: CSV and markdown keep it readable
    row["selection"] = json.dumps(result.selection, sort_keys=True) if result.selection else None
    row.update({f"metric.{task}": value for task, value in result.metrics.items()})
    row["average_low"], row["average_high"] = (result.interval or {}).get("average") or (None, None)
    seeds = getattr(result, "seeds", None)  # a row of several seeds (mergebench.table.SeedMean)
    if seeds is not None:
        row["seeds"] = len(seeds) or 1
        row["average_std"] = result.average_std if len(seeds) > 1 else None
        row["extra_storage_std"] = result.storage_std if len(seeds) > 1 else None
        row.update({f"std.{task}": value for task, value in result.metrics_std.items()})
    row.update({f"hp.{name}": value for name, value in result.hyperparameters.items()})
    row.update({f"examples.{task}": count for task, count in (result.examples or {}).items()})
    row.update({f"version.{package}": version for package, version in result.versions.items()})
    return row


def to_frame(results: list[Result], where: list[str] | None = None):
    """A pandas DataFrame of ``results``, one row each: the record's fields, then per task
    ``metric.<task>`` (fractions, as recorded), each hyperparameter as ``hp.<name>``,
    ``examples.<task>`` and ``version.<package>``; with ``where``, the ``file:line`` of each.
    ``average_low``/``average_high``: the bounds of the average's 95 % interval (missing if not recorded).
    Rows of several seeds (the leaderboard's) add ``seeds``, ``average_std``, ``extra_storage_std``
    (their ``extra_storage_bytes`` is the seeds' mean) and ``std.<task>``.
    Columns keep the first record's task order; a value a record lacks is missing (NaN/None)."""
    import pandas as pd  # lazily: reading records and the command line need no pandas

    rows = [_frame_row(result) for result in results]
    if where is not None:
        for row, place in zip(rows, where, strict=True):
            row["where"] = place
    columns = list(dict.fromkeys(name for row in rows for name in row))
    first = [name for name in _FRAME_FIELDS if name != "average"]
    groups = [first[:first.index("seed") + 1], [c for c in columns if c.startswith("metric.")],
              ["average", "average_low", "average_high"],
              [c for c in ("seeds", "average_std", "extra_storage_std") if c in columns],
              [c for c in columns if c.startswith("std.")],
              first[first.index("seed") + 1:], [c for c in columns if c.startswith("hp.")],
              [c for c in columns if c.startswith("examples.")], [c for c in columns if c.startswith("version.")],
              ["where"] if where is not None else []]
    ordered = [name for group in groups for name in group]
    frame = pd.DataFrame.from_records(rows, columns=ordered) if rows else pd.DataFrame(columns=ordered)
    if "seeds" in frame:
        frame["seeds"] = frame["seeds"].fillna(1).astype(int)  # a row of its own is one seed
    return frame


def load(path: Path | str):
    """Every record of a results file or folder as a pandas DataFrame (``to_frame``), with
    the ``where`` (file:line) of each; a malformed record raises RecordError like the leaderboard."""
    path = Path(path)
    if path.is_file():
        located = list(_iter_file(path))
    elif path.is_dir():
        located = list(iter_records(path))
    else:
        raise RecordError(f"{path}: no such results file or folder")
    return to_frame([result for _, result in located], where=[place for place, _ in located])
