"""The checkpoint files every converting suite shares: ``mergebench prepare`` writes the
pretrained and fine-tuned encoder states once as safetensors under ``self.root``, and
reading them before that fails at once, saying how to prepare them."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from mergebench.backbone import Backbone
from mergebench.errors import CheckpointError, MissingResourceError


def check_like_pretrained(source: Path, encoder: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """A converted fine-tuned encoder must have the pretrained model's keys and shapes, or
    the merge would pair the wrong tensors: CheckpointError naming the file and the tensor."""
    missing, extra = sorted(set(reference) - set(encoder)), sorted(set(encoder) - set(reference))
    if missing or extra:
        raise CheckpointError(f"{source}: encoder keys differ from the pretrained model "
                              f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    for key, value in encoder.items():
        if value.shape != reference[key].shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                                  f"the pretrained model has {tuple(reference[key].shape)}")


class PreparedBackbone(Backbone):
    """A backbone whose checkpoints live, once prepared, in ``root/pretrained.safetensors``
    and ``root/<task>.safetensors``."""

    root: Path  # where `prepare` writes (set by the subclass, or a property)
    prepare_hint: ClassVar[str] = ""  # said after the `prepare` command in a missing-file error
    # whether prepare() builds the checkpoints by itself, locally, from data that ships or installs
    # with it: then a run prepares it when it is not prepared yet, and `mergebench prepare` replaces
    # a corrupt one (mergebench.manifest); suites converting downloads need --force
    rebuilds_checkpoints: ClassVar[bool] = False

    def pretrained_checkpoint(self) -> Path:
        return self.require(self.root / "pretrained.safetensors")

    def finetuned_checkpoint(self, task: str) -> Path:
        self.check_task(task)
        return self.require(self.root / f"{task}.safetensors")

    def require(self, path: Path) -> Path:
        """``path``, which ``prepare`` writes; MissingResourceError saying how to prepare it if absent."""
        if not path.exists():
            hint = f" {self.prepare_hint}" if self.prepare_hint else ""
            raise MissingResourceError(f"{path} is missing: run `mergebench prepare --backbone {self.name}`{hint}")
        return path
