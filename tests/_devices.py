"""The device-agnostic test layer: ``device``, a fixture parametrised over every device this
machine has (the CPU always; CUDA and MPS where present), so the same test checks each."""
from __future__ import annotations

import pytest
import torch


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    backend = getattr(torch.backends, "mps", None)
    if backend is not None and backend.is_available():
        devices.append("mps")
    return devices


@pytest.fixture(params=available_devices())
def device(request) -> torch.device:
    return torch.device(request.param)
