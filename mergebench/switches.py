"""The store of compressed task vectors (switches) that T-Switch and FlexSwitch compose at
inference: one codec container per task, kept packed, composed from the packed form."""
from __future__ import annotations

import math

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

    __slots__ = ("n", "width", "codes", "table", "_byte_values")

    def __init__(self, compressed: CompressedTensor):
        self.n = compressed.n
        levels = 1 << compressed.bits
        self.width = next(w for w in (2, 4, 8, 16) if levels + 1 <= 1 << w)
        self.table = np.zeros(1 << self.width, dtype=np.float32)
        self.table[1:levels + 1] = _code_values(compressed, np.arange(levels, dtype=np.uint8))
        full = np.zeros(self.n, dtype=np.uint16 if self.width == 16 else np.uint8)
        full[np.flatnonzero(compressed.mask)] = compressed.codes.astype(full.dtype) + 1
        self.codes = full if self.width >= 8 else np.frombuffer(pack_codes(full, self.width), dtype=np.uint8)
        self._byte_values = None
        if self.width < 8:  # (256, 8 // width): the values of the codes each byte value holds
            shifts = self.width * np.arange(8 // self.width, dtype=np.uint8)
            self._byte_values = self.table[(np.arange(256, dtype=np.uint8)[:, None] >> shifts) & ((1 << self.width) - 1)]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.table.nbytes

    def scaled(self, weight: np.float32) -> np.ndarray:
        """weight * (the decoded switch), flat float32: each code's value times the weight,
        the products rounded to float32 as a dense product would be, expanded by table look-up."""
        if self.width >= 8:
            return (weight * self.table)[self.codes]  # float32 products, one per code
        return np.take(self._items(weight), self.codes).view(np.float32)[:self.n]

    def scaled_into(self, weight: np.float32, out: np.ndarray) -> None:
        """``scaled(weight)`` written into ``out``, a float32 array of ``padded`` entries."""
        # mode "wrap": every code is a valid index, and unlike "raise" it writes ``out`` unbuffered
        if self.width >= 8:
            np.take(weight * self.table, self.codes, out=out, mode="wrap")
        else:
            np.take(self._items(weight), self.codes, out=out.view(np.complex128 if self.width == 2 else np.int64),
                    mode="wrap")

    @property
    def padded(self) -> int:
        """Entries of the expanded switch before it is cut to ``n`` (whole bytes of codes)."""
        return self.n if self.width >= 8 else len(self.codes) * (8 // self.width)

    def _items(self, weight: np.float32) -> np.ndarray:
        """Each byte's values times ``weight`` (float32 products) as one 8- or 16-byte item:
        a flat take of these is faster than a row gather."""
        byte_table = weight * self._byte_values  # the same products as (weight * table)[codes]
        return byte_table.view(np.complex128 if self.width == 2 else np.int64).ravel()


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
        self.sizes = [math.prod(shape) for shape in self.shapes.values()]
        self._scratch: np.ndarray | None = None  # combine_into's expansion buffer, as large as the largest tensor

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

    def combine_into(self, key: str, weights: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
        """out = base + combine(key, weights) bit for bit (the same float32 products and sums
        in the same order; base + total equals total + base), written in place: the first
        active switch is expanded into ``out``, each further one into a reused scratch array."""
        active = [(switch, np.float32(weight)) for switch, weight
                  in zip(self.switches[key], weights.detach().to("cpu", torch.float32).numpy())
                  if weight != 0 and switch is not None]
        plain = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (base, out))
        if not active or not plain or any(switch.padded != switch.n for switch, _ in active):
            return super().combine_into(key, weights, base, out)
        target = out.numpy().reshape(-1)
        for i, (switch, weight) in enumerate(active):
            if i == 0:
                switch.scaled_into(weight, target)
                continue
            if self._scratch is None or len(self._scratch) < switch.n:
                self._scratch = np.empty(max(self.sizes), dtype=np.float32)
            scratch = self._scratch[:switch.n]
            switch.scaled_into(weight, scratch)
            np.add(target, scratch, out=target)
        np.add(target, base.detach().numpy().reshape(-1), out=target)
