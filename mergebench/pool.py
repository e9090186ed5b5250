"""ModelPool: the pretrained weights plus one fine-tuned checkpoint per task.

Checkpoints stay on disk as safetensors and are read tensor by tensor, so a method
that merges key by key holds only K+1 copies of one tensor at a time, never K
models. Every checkpoint is verified on first use against the prepare manifest (size
and SHA-256; ``mergebench.manifest``, which also found its values finite) and against
the pretrained one (same keys, shapes and dtypes); errors name the file and tensor.
A checkpoint the manifest does not list (no manifest, or a file a test wrote) has its
values checked for NaN and inf instead.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergebench.backbone import Backbone
from mergebench.manifest import check_finite, read_manifest, verify


from mergebench.errors import CheckpointError  # noqa: E402  (re-exported)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _dtype(handle, key: str) -> torch.dtype | None:
    """The torch dtype of a stored tensor without reading it (None: not floating point)."""
    return _DTYPES.get(handle.get_slice(key).get_dtype())


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


class ModelPool:
    def __init__(self, backbone: Backbone, tasks: list[str] | None = None):
        self.backbone = backbone
        self.tasks = list(tasks) if tasks is not None else [t.name for t in backbone.tasks]
        self._stack = ExitStack()
        self.manifest = read_manifest(backbone)
        self.manifest_sha256 = self.manifest.sha256 if self.manifest is not None else None  # recorded with results
        self._pretrained = self._stack.enter_context(self._open_checked(backbone.pretrained_checkpoint()))
        self._finetuned: dict[str, object] = {}
        self._keys = sorted(self._pretrained.keys())
        self.merged_keys = [k for k in self._keys if backbone.is_merged(k, _dtype(self._pretrained, k))]
        self._validated: set[str] = set()

    # --- access -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def pretrained(self, key: str) -> torch.Tensor:
        return self._pretrained.get_tensor(key)

    def finetuned(self, task: str, key: str) -> torch.Tensor:
        return self._handle(task).get_tensor(key)

    def task_vector(self, task: str, key: str) -> torch.Tensor:
        """tau_k = theta_k - theta_pre for one tensor."""
        return self.finetuned(task, key) - self.pretrained(key)

    def task_vectors(self, key: str) -> list[torch.Tensor]:
        """One tensor's task vectors for every task, in task order."""
        pre = self.pretrained(key)
        return [self.finetuned(task, key) - pre for task in self.tasks]

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return {key: self.pretrained(key) for key in self._keys}

    def finetuned_state(self, task: str) -> dict[str, torch.Tensor]:
        self._handle(task)
        return load_file(str(self.backbone.finetuned_checkpoint(task)))

    def checkpoint_paths(self) -> dict[str, Path]:
        return {task: self.backbone.finetuned_checkpoint(task) for task in self.tasks}

    # --- validation -----------------------------------------------------------
    def _handle(self, task: str):
        if task not in self._finetuned:
            if task not in self.tasks:
                raise KeyError(f"task {task!r} is not in the pool; tasks: {', '.join(self.tasks)}")
            path = self.backbone.finetuned_checkpoint(task)
            handle = self._open_checked(path)
            try:
                self._validate(path, handle)
            except BaseException:
                handle.__exit__(None, None, None)
                raise
            self._finetuned[task] = self._stack.enter_context(handle)
        return self._finetuned[task]

    def _open_checked(self, path: Path):
        """A checkpoint verified against the manifest, or read in full and found finite."""
        verified = self.manifest is not None and path.is_file() and verify(self.backbone, self.manifest, path)
        handle = _open(path)
        if not verified:
            try:
                check_finite(handle, path)
            except BaseException:
                handle.__exit__(None, None, None)
                raise
        return handle

    def _validate(self, path: Path, handle) -> None:
        keys = set(handle.keys())
        missing, extra = set(self._keys) - keys, keys - set(self._keys)
        if missing or extra:
            raise CheckpointError(
                f"{path}: keys differ from the pretrained checkpoint "
                f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(extra)[:5]})"
            )
        for key in self._keys:
            ours, theirs = self._pretrained.get_slice(key), handle.get_slice(key)
            if ours.get_shape() != theirs.get_shape() or ours.get_dtype() != theirs.get_dtype():
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {theirs.get_shape()} {theirs.get_dtype()}, "
                    f"pretrained has {ours.get_shape()} {ours.get_dtype()}"
                )

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
