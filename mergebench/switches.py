"""The store of compressed task vectors (switches) that T-Switch and FlexSwitch compose at
inference: one codec container per task, decoded into per-tensor stacks."""
from __future__ import annotations

import torch

from mergebench.container import decode_tensors
from mergebench.dynamic import TaskVectorStore
from mergebench.errors import CorruptArtifactError


class SwitchStore(TaskVectorStore):
    """The decoded compressed task vectors of every task (``artifacts[task + suffix]``, e.g.
    T-Switch's beta_k A_k (.) P_k), stacked per tensor as a (K, n) float matrix, so composing
    any weight vector is one matrix product. The artifacts are decoded one task at a time
    into the stacks, so that decoding holds no more than one task's masks and codes beside them."""

    def __init__(self, tasks: list[str], artifacts: dict[str, bytes], suffix: str = ".tswitch"):
        self.tasks = tasks
        self.switches: dict[str, torch.Tensor] = {}
        for k, task in enumerate(tasks):
            source = task + suffix
            if source not in artifacts:
                raise CorruptArtifactError(f"missing switch artifact {source}")
            contents = decode_tensors(artifacts[source], source=source)
            for key in contents:
                compressed = contents.compressed(key)
                stack = self.switches.get(key)
                if stack is None:
                    stack = self.switches[key] = torch.zeros(len(tasks), *compressed.shape)
                elif tuple(stack.shape[1:]) != compressed.shape:
                    raise CorruptArtifactError(f"{source}: tensor {key!r} has shape {list(compressed.shape)}, "
                                               f"other tasks have {list(stack.shape[1:])}")
                stack[k] = compressed.to_dense()
        self._keys = sorted(self.switches)

    def keys(self) -> list[str]:
        return list(self._keys)

    def combine(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        switches = self.switches[key]
        active = weights.nonzero().squeeze(1)
        if len(active) == 1:  # task identity known: a scaled copy, no product needed
            return weights[active[0]] * switches[active[0]]
        return (weights.float() @ switches.view(len(self.tasks), -1)).view(switches.shape[1:])
