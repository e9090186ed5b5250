"""Where evaluation runs and at which precision: ``--device`` and ``--precision``.

Both are checked when a run is resolved, so a device this machine lacks fails in seconds,
before any merge. Merging arithmetic stays float32 on the CPU; only evaluation (the
encoder forwards) moves to the device, under autocast when the precision is not fp32.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, ContextManager, Mapping

import torch

from mergebench.errors import HyperparameterError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _found() -> str:
    """What this machine offers, for error messages."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return ", ".join(found)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``; "auto" picks CUDA, else MPS, else the CPU.
    HyperparameterError naming what was asked and what this machine has if it is absent."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise HyperparameterError(f"--device {name!r} is not allowed; expected one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise HyperparameterError(f"--device mps: MPS is not available (torch {torch.__version__}; found: {_found()})")
        return torch.device("mps")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no usable GPU"
        raise HyperparameterError(f"--device {name}: CUDA is not available (torch {torch.__version__} {built}; "
                                  f"found: {_found()})")
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise HyperparameterError(f"--device {name}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                                  f"(found: {_found()})")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> str:
    """``--precision`` checked against the device. fp16 on the CPU is refused: CPU kernels
    gain nothing from it and some fall back or lose accuracy; bf16 is the CPU's low precision."""
    if precision not in PRECISIONS:
        raise HyperparameterError(f"--precision {precision!r} is not allowed; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise HyperparameterError("--precision fp16 is not supported on the CPU; use bf16 or fp32 there")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HyperparameterError(f"--precision bf16: {describe_device(device)} does not support bfloat16; use fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (fp32: none at all, so the
    float32 path runs exactly as without this module)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_device(device: torch.device) -> str:
    """The device as records show it: "cpu", or "cuda:0 (NVIDIA H200)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def to_device(value: Any, device: torch.device) -> Any:
    """Every tensor in a batch (a tensor, or a mapping / list / tuple of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_device(item, device) for item in value] if isinstance(value, list) \
            else tuple(to_device(item, device) for item in value)
    return value


def to_cpu_float(value: Any) -> Any:
    """Outputs back on the CPU for scoring, low-precision floats widened to float32 (a
    float32 CPU tensor is returned as it is)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != torch.float32 and value.dtype != torch.float64:
            value = value.float()
        return value.cpu()
    if isinstance(value, Mapping):
        return {key: to_cpu_float(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_cpu_float(item) for item in value] if isinstance(value, list) \
            else tuple(to_cpu_float(item) for item in value)
    return value
