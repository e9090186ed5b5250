"""The prepare manifest: the size and SHA-256 of every prepared checkpoint of a backbone.

A truncated download, a conversion cut short or a flipped bit would otherwise be merged
and recorded like any other result. :func:`prepare_checkpoints` (what ``mergebench
prepare`` and every run call) writes the manifest once it has read every tensor of each
file and found them finite; the ModelPool verifies each file it opens against it. Hashes
are cached by (path, size, mtime) in :mod:`mergebench.filehash`, so a warm check costs
one ``stat`` per file.

Where it lives: ``<root>/checkpoint-manifest.json`` for a backbone that prepares its
checkpoints into one folder ``root`` (``PreparedBackbone``: every built-in suite), so it
is copied and deleted with them; for any other backbone, or a root this user cannot
write, ``cache_dir()/manifests/<backbone>-<hash of the checkpoints' folder>.json``.
Files inside the manifest's folder are named relative to it, others by absolute path.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from mergebench.backbone import Backbone
from mergebench.cache import cache_dir, write_json
from mergebench.errors import CheckpointError, MissingResourceError
from mergebench.filehash import file_sha256

MANIFEST_NAME = "checkpoint-manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    files: dict[str, Entry]  # file name (see module docstring) -> what it was when prepared
    sha256: str  # of the manifest file's bytes: what a result records

    def entry(self, file: Path) -> Entry | None:
        return self.files.get(_name(self.path, file))

    def items(self) -> Iterator[tuple[Path, Entry]]:
        for name, entry in self.files.items():
            yield self.path.parent / name, entry  # an absolute name stays absolute


# --- where ---------------------------------------------------------------------------
def _writable(folder: Path) -> bool:
    """Whether ``folder`` can be written, or created under its nearest existing parent."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def manifest_path(backbone: Backbone) -> Path:
    root = getattr(backbone, "root", None)
    if root is not None and ((Path(root) / MANIFEST_NAME).exists() or _writable(Path(root))):
        return Path(root) / MANIFEST_NAME
    folder = Path(root) if root is not None else Path(backbone.pretrained_checkpoint()).parent
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "manifests" / f"{backbone.name}-{digest}.json"


def _name(manifest: Path, file: Path) -> str:
    file, folder = Path(file).resolve(), manifest.parent.resolve()
    return file.relative_to(folder).as_posix() if file.is_relative_to(folder) else str(file)


def checkpoint_files(backbone: Backbone) -> list[Path]:
    """The pretrained checkpoint and every task's fine-tuned one."""
    return [backbone.pretrained_checkpoint(), *(backbone.finetuned_checkpoint(task.name) for task in backbone.tasks)]


# --- reading and writing ---------------------------------------------------------------
def _load(path: Path) -> Manifest | None:
    """The manifest in ``path``, None if there is none; ValueError saying why it is not one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
        files = {str(name): Entry(int(e["size"]), str(e["sha256"])) for name, e in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid checkpoint manifest ({error})") from None
    return Manifest(path, files, hashlib.sha256(raw).hexdigest())


def read_manifest(backbone: Backbone) -> Manifest | None:
    """The backbone's manifest, or None if it has none (prepared by an older version, or never)."""
    try:
        return _load(manifest_path(backbone))
    except ValueError as error:
        raise CheckpointError(f"{error}; `mergebench prepare --backbone {backbone.name}` writes a new one") from None


def _write(backbone: Backbone, path: Path, entries: dict[Path, Entry]) -> Manifest:
    files = {_name(path, file): {"size": e.size, "sha256": e.sha256} for file, e in entries.items()}
    write_json(path, {"version": FORMAT_VERSION, "backbone": backbone.name, "files": files})
    return read_manifest(backbone)


# --- checks ----------------------------------------------------------------------------------
def check_finite(handle, file: Path) -> None:
    """CheckpointError naming the first floating tensor of an open safetensors file with NaN or inf."""
    for key in handle.keys():
        tensor = handle.get_tensor(key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {key!r} has NaN or infinite values")


def inspect(file: Path) -> Entry:
    """Size and SHA-256 of a checkpoint whose every tensor was read and found finite."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            check_finite(handle, file)
    except CheckpointError:
        raise
    except Exception as error:  # safetensors and the OS raise their own types
        raise CheckpointError(f"cannot read checkpoint {file}: {error}") from error
    return Entry(file.stat().st_size, file_sha256(file))


def mismatch(file: Path, entry: Entry) -> str | None:
    """How a file differs from its manifest entry (naming it), or None."""
    size = file.stat().st_size
    if size != entry.size:
        return f"{file} is {size} bytes, its manifest says {entry.size}"
    digest = file_sha256(file)
    if digest != entry.sha256:
        return f"{file} has SHA-256 {digest[:16]}…, its manifest says {entry.sha256[:16]}…"
    return None


def rebuilds_checkpoints(backbone: Backbone) -> bool:
    """Whether the backbone's ``prepare`` builds its checkpoints by itself, locally, from data
    that ships or installs with it (a class attribute ``rebuilds_checkpoints``; suites that
    convert downloads do not): then a run prepares it when it is not prepared yet, and
    ``mergebench prepare`` rebuilds one deleted or corrupt checkpoint."""
    return bool(getattr(backbone, "rebuilds_checkpoints", False))


def is_prepared(backbone: Backbone) -> bool:
    """Whether every checkpoint file exists (not whether it is intact: the manifest checks that)."""
    try:
        return all(Path(file).exists() for file in checkpoint_files(backbone))
    except MissingResourceError:  # a PreparedBackbone names a missing file this way
        return False


def integrity_error(backbone: Backbone, problems: Iterable[str]) -> CheckpointError:
    """The error for corrupt checkpoints: each named, and how to prepare them again."""
    command = f"mergebench prepare --backbone {backbone.name}"
    hint = getattr(backbone, "prepare_hint", "")
    if rebuilds_checkpoints(backbone):
        remedy = f"run `{command}`{f' {hint}' if hint else ''}, which rebuilds it, or add --force to rebuild every file"
    else:
        remedy = f"run `{command} --force`{f' {hint}' if hint else ''} to prepare the backbone again"
    return CheckpointError(f"{'; '.join(problems)}: corrupt, truncated or changed since it was prepared; {remedy}")


def verify(backbone: Backbone, manifest: Manifest, file: Path) -> bool:
    """Whether the manifest lists ``file``; if it does, CheckpointError unless the file has
    the size and SHA-256 it lists."""
    entry = manifest.entry(file)
    if entry is None:
        return False
    problem = mismatch(file, entry)
    if problem is not None:
        raise integrity_error(backbone, [problem])
    return True


# --- prepare ------------------------------------------------------------------------------------
def _stamp(file: Path) -> tuple[int, int, int] | None:
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _repair_or_refuse(backbone: Backbone, problems: dict[Path, str], repair: bool) -> set[Path]:
    """Delete the bad files so that ``prepare`` rebuilds them (where it can and ``repair``
    allows), else raise naming them."""
    if not problems:
        return set()
    if not (repair and rebuilds_checkpoints(backbone)):
        raise integrity_error(backbone, problems.values())
    for file, problem in problems.items():
        print(f"mergebench: {problem}; rebuilding it", file=sys.stderr)
        file.unlink(missing_ok=True)
    return set(problems)


def _recorded(backbone: Backbone) -> Manifest | None:
    try:
        return _load(manifest_path(backbone))
    except ValueError as error:  # every file is inspected again instead
        print(f"mergebench: {error}; checking every checkpoint to write a new one", file=sys.stderr)
        return None


def prepare_checkpoints(backbone: Backbone, force: bool = False, repair: bool = True) -> Manifest:
    """``backbone.prepare(force)`` with checkpoints that are what the manifest says.

    Before: recorded files that exist must match the manifest (a prepare that reads them,
    e.g. to fine-tune from the pretrained one, must not start from a corrupt file). After:
    every file new, rewritten, or without a manifest yet is read in full (readable,
    finite) and recorded. A bad file is deleted and rebuilt where ``repair`` is set and the
    backbone rebuilds single files (the locally fine-tuned suites); otherwise it is a
    CheckpointError naming the file and ``--force``. Runs pass ``repair=False``: a corrupt
    checkpoint stops the run rather than being rebuilt under it, but a backbone that prepares
    locally and is not prepared yet is prepared (one line on stderr says so), so that install
    and run are the only two commands; any other backbone's ``prepare`` says what is missing.
    """
    if not repair and rebuilds_checkpoints(backbone) and not is_prepared(backbone):
        print(f"mergebench: {backbone.name} is not prepared yet; preparing it now, once, from its local data "
              f"(what `mergebench prepare --backbone {backbone.name}` does)", file=sys.stderr, flush=True)
    recorded = None if force else _recorded(backbone)
    stamps: dict[str, tuple | None] = {}  # by manifest name: the files as verified before prepare
    if recorded is not None:
        bad = {file: problem for file, entry in recorded.items()
               if file.exists() and (problem := mismatch(file, entry)) is not None}
        _repair_or_refuse(backbone, bad, repair)  # deleted: not stamped below, so inspected after prepare
        stamps = {name: _stamp(recorded.path.parent / name) for name in recorded.files}
    backbone.prepare(force=force)

    entries: dict[Path, Entry] = {}
    bad = {}
    for file in checkpoint_files(backbone):
        entry, before = (recorded.entry(file), stamps.get(_name(recorded.path, file))) if recorded else (None, None)
        if entry is not None and before is not None and _stamp(file) == before:
            entries[file] = entry  # verified above and untouched by prepare since
            continue
        try:
            entries[file] = inspect(file)
        except CheckpointError as error:
            bad[file] = str(error)
    if bad:
        again = _repair_or_refuse(backbone, bad, repair and not force)
        backbone.prepare()
        entries.update({file: inspect(file) for file in again})  # rebuilding did not help: the error as it is

    path = manifest_path(backbone)
    unchanged = recorded is not None and recorded.path == path
    if unchanged and {_name(path, file): entry for file, entry in entries.items()} == recorded.files:
        return recorded
    manifest = _write(backbone, path, entries)
    report_reference(backbone, manifest)
    return manifest


def report_reference(backbone: Backbone, manifest: Manifest) -> None:
    """One line on stderr saying whether newly prepared checkpoints are the ones the
    committed results were scored with (``backbone.reference_checkpoints``): a locally
    fine-tuned suite can round differently on another CPU or library version, and then
    its results are another set's (the leaderboard shows each set apart)."""
    reference = backbone.reference_checkpoints
    if reference is None:
        return
    if manifest.sha256 == reference:
        print(f"mergebench: {backbone.name}: the checkpoints reproduce the committed results' "
              f"(checkpoint manifest {reference[:12]})", file=sys.stderr)
    else:
        print(f"mergebench: {backbone.name}: the checkpoints (manifest {manifest.sha256[:12]}) differ from those "
              f"the committed results used ({reference[:12]}): other library versions or another CPU round "
              "differently, so results on them are a set of their own on the leaderboard", file=sys.stderr)
