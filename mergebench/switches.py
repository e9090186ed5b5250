"""The store of compressed task vectors (switches) that T-Switch and FlexSwitch compose at
inference: one codec container per task, kept packed, composed from the packed form."""
from __future__ import annotations

import numpy as np
import torch

from mergebench.codecs import CompressedTensor, pack_codes
from mergebench.container import decode_tensors
from mergebench.dynamic import TaskVectorStore
from mergebench.errors import CorruptArtifactError


class PackedSwitch:
    """One task's switch of one tensor as packed codes: per entry a code of ``width`` bits,
    0 for an entry the mask drops and c + 1 for a kept entry of value code c (T-Switch: the
    polarity bit; FlexSwitch: the b-bit BAS code), so a ternary switch takes 2 bits per
    entry, and ``table[code]`` its float32 value (0 for code 0). ``table`` holds exactly the
    values ``CompressedTensor.values()`` gives each code, so expanding is exact."""

    __slots__ = ("n", "width", "codes", "table")

    def __init__(self, compressed: CompressedTensor):
        self.n = compressed.n
        levels = 1 << compressed.bits
        self.width = next(w for w in (2, 4, 8, 16) if levels + 1 <= 1 << w)
        self.table = np.zeros(1 << self.width, dtype=np.float32)
        self.table[1:levels + 1] = _code_values(compressed, np.arange(levels, dtype=np.uint8))
        full = np.zeros(self.n, dtype=np.uint16 if self.width == 16 else np.uint8)
        full[np.flatnonzero(compressed.mask)] = compressed.codes.astype(full.dtype) + 1
        self.codes = full if self.width >= 8 else np.frombuffer(pack_codes(full, self.width), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.table.nbytes

    def scaled(self, weight: np.float32) -> np.ndarray:
        """weight * (the decoded switch), flat float32: each code's value times the weight,
        the products rounded to float32 as a dense product would be, expanded by table look-up."""
        table = weight * self.table  # float32 products, one per code
        if self.width >= 8:
            return table[self.codes]
        per = 8 // self.width
        shifts = self.width * np.arange(per, dtype=np.uint8)
        byte_table = table[(np.arange(256, dtype=np.uint8)[:, None] >> shifts) & ((1 << self.width) - 1)]
        # each byte's `per` values as one 8- or 16-byte item: a flat take, faster than a row gather
        items = np.ascontiguousarray(byte_table).view(np.complex128 if per == 4 else np.int64).ravel()
        return np.take(items, self.codes).view(np.float32)[:self.n]


def _code_values(compressed: CompressedTensor, codes: np.ndarray) -> np.ndarray:
    """The float32 value of every code of ``codes``, computed as ``CompressedTensor.values``
    computes the values of the kept entries (the same elementwise operations)."""
    template = CompressedTensor((len(codes),), compressed.fmt, compressed.bits, np.ones(len(codes), dtype=np.bool_),
                                codes, compressed.quant, dict(compressed.params), compressed.dtype)
    return template.values()


class SwitchStore(TaskVectorStore):
    """The compressed task vectors of every task (``artifacts[task + suffix]``, e.g. T-Switch's
    beta_k A_k (.) P_k), kept packed per task and tensor (``PackedSwitch``: 2 bits per entry
    for a ternary switch, b + 1 bits rounded up to 4, 8 or 16 for b-bit codes), never as dense
    float stacks. The artifacts are decoded one task at a time, so decoding holds no more
    than one task's masks and codes beside the packed store.

    ``combine`` expands the switches with a non-zero weight, each scaled by its weight, and
    adds them in task order: the sum a dense (K, n) float32 stack multiplied by the weight
    vector gives (one active task: its scaled copy)."""

    def __init__(self, tasks: list[str], artifacts: dict[str, bytes], suffix: str = ".tswitch"):
        self.tasks = tasks
        self.switches: dict[str, list[PackedSwitch | None]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for k, task in enumerate(tasks):
            source = task + suffix
            if source not in artifacts:
                raise CorruptArtifactError(f"missing switch artifact {source}")
            contents = decode_tensors(artifacts[source], source=source)
            for key in list(contents):
                compressed = contents.compressed(key)
                shape = self.shapes.setdefault(key, tuple(compressed.shape))
                if shape != tuple(compressed.shape):
                    raise CorruptArtifactError(f"{source}: tensor {key!r} has shape {list(compressed.shape)}, "
                                               f"other tasks have {list(shape)}")
                self.switches.setdefault(key, [None] * len(tasks))[k] = PackedSwitch(compressed)
                del contents[key]  # its mask and codes go as soon as they are packed
        self._keys = sorted(self.switches)

    def keys(self) -> list[str]:
        return list(self._keys)

    def nbytes(self) -> int:
        """The memory the packed switches take."""
        return sum(s.nbytes for switches in self.switches.values() for s in switches if s is not None)

    def combine(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.detach().to("cpu", torch.float32).numpy()
        total = None
        for switch, weight in zip(self.switches[key], weights):
            if weight == 0 or switch is None:
                continue
            part = switch.scaled(np.float32(weight))
            total = part if total is None else np.add(total, part, out=total)
        if total is None:
            return torch.zeros(self.shapes[key])
        return torch.from_numpy(total).view(self.shapes[key])
