"""Where prepared data and checkpoints live, and how files are written safely."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch


def cache_dir() -> Path:
    """``$MERGEBENCH_CACHE`` or ``~/.cache/mergebench``."""
    return Path(os.environ.get("MERGEBENCH_CACHE", Path.home() / ".cache" / "mergebench"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place:
    a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return write_atomically(path, write)


def write_json(path: Path, data: Any) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def update_json(path: Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the JSON object in ``path`` (created if missing), atomically;
    e.g. a prepared backbone's sources.json, which a later ``prepare`` extends."""
    path = Path(path)
    data = {**(json.loads(path.read_text()) if path.exists() else {}), **updates}
    write_json(path, data)
    return data


def write_safetensors(path: Path, state: Mapping[str, "torch.Tensor"], float32: bool = False) -> Path:
    """A state dict as a safetensors file, atomically; ``float32`` casts the floating tensors
    (prepared checkpoints share one dtype whatever the published one was)."""
    from safetensors.torch import save_file

    tensors = {k: (v.float() if float32 and v.is_floating_point() else v).detach().contiguous() for k, v in state.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
