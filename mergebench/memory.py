"""Peak memory of one piece of work, not of the whole process; and whether a method's
weights fit the memory free where it runs, checked before it starts (``check_fits``).

``ru_maxrss`` is the process's high-water mark: in a run of several methods the
second would inherit the first one's peak. On Linux the kernel's peak resident set
size can be reset (``/proc/self/clear_refs``, value 5) and read back (``VmHWM``),
which measures exactly one method's peak at no cost. Where that is not possible the
tracker samples the resident set size in a background thread (a lower bound between
samples) and says so in ``scope``.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from mergebench.errors import InsufficientMemoryError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PAGE = resource.getpagesize()


def _vm_hwm_bytes() -> int | None:
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _current_rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def process_peak_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """``with PeakMemory() as peak: work()`` then ``peak.bytes`` (and ``peak.scope``:
    "kernel" reset high-water mark, "sampled" every ``interval`` s, or "process" when
    neither is available and the figure is the process's high-water mark)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.bytes = 0
        self.scope = "process"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        try:
            _CLEAR_REFS.write_text("5")
            if _vm_hwm_bytes() is not None:
                self.scope = "kernel"
                return self
        except OSError:
            pass
        if _current_rss_bytes() is not None:
            self.scope = "sampled"
            self.bytes = _current_rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, _current_rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self.scope == "kernel":
            self.bytes = _vm_hwm_bytes() or process_peak_bytes()
        elif self.scope == "sampled":
            self._stop.set()
            self._thread.join()
            self.bytes = max(self.bytes, _current_rss_bytes() or 0)
        else:
            self.bytes = process_peak_bytes()


# --- will it fit? -------------------------------------------------------------------------
# Every estimate counts weights only, in float32 (the merging arithmetic), from the tensor sizes
# in the pretrained checkpoint's header: M = the whole encoder, T = its merged tensors, L = its
# largest merged tensor, K = the tasks. Activations of one batch are left out and compressed
# stores are counted at their smallest, so a refusal means the weights alone do not fit. Per
# method kind (host: RAM; device: the run's device, which is RAM too on the CPU):
#   static, streamed tensor by tensor     host 2M + K L   (merged state + the encoder holding it;
#                                                          the K copies of one tensor)   device M
#   fisher   host 2M + 4T (encoder, theta sums, Fisher sums, mask)   device 2M (encoder, gradients)
#   regmean  host M + T + 8 (in^2 + in out) summed over the linear weights (float64 Grams and sums)
#            device M
#   adamerging, adamerging++   device K T + 2M + 2T (the K stacked task vectors, the pretrained
#            weights and encoder, one merged copy and its gradient)   host 2M
#   dynamic (switches, masks, experts)   device M + 2T + K T / 16 (the encoder, the pretrained
#            copy of the switched tensors, one composed set, the K parts at 2 bits per entry:
#            T-Switch's packed ternary codes, the smallest form of any store here)   host M
#   flexswitch, auto-flexswitch   as dynamic, and while one task trains on the device its
#            gates hold tau and the 4 quantised levels: device M + 6T + K T / 16
_STATIC = "static"
KINDS = {"fisher": "fisher", "regmean": "regmean", "adamerging": "adamerging", "adamerging++": "adamerging",
         "flexswitch": "flexswitch", "auto-flexswitch": "flexswitch"}


def checkpoint_sizes(path: Path, merged_keys: set[str]) -> tuple[int, int, int]:
    """(M, T, L) in float32 bytes, read from a safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    whole = merged = largest = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            numel = 1
            for size in handle.get_slice(key).get_shape():
                numel *= size
            whole += 4 * numel
            if key in merged_keys:
                merged += 4 * numel
                largest = max(largest, 4 * numel)
    return whole, merged, largest


def linear_gram_bytes(path: Path, merged_keys: set[str]) -> int:
    """RegMean's float64 Gram sums (in x in) and weighted sums (in x out) over the 2-D merged weights."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in merged_keys:
            shape = handle.get_slice(key).get_shape()
            if len(shape) == 2:
                out_features, in_features = shape
                total += 8 * (in_features * in_features + in_features * out_features)
    return total


def estimate_footprint(method: Any, pool: Any) -> tuple[int, int]:
    """(host bytes, device bytes) that ``method`` holds while merging ``pool`` and evaluating
    (the table above)."""
    path = pool.backbone.pretrained_checkpoint()
    keys = set(pool.merged_keys)
    m, t, largest = checkpoint_sizes(path, keys)
    k = len(pool.tasks)
    kind = KINDS.get(getattr(method, "name", ""), "dynamic" if getattr(method, "dynamic", False) else _STATIC)
    if kind == "fisher":
        return 2 * m + 4 * t, 2 * m
    if kind == "regmean":
        return m + t + linear_gram_bytes(path, keys), m
    if kind == "adamerging":
        return 2 * m, k * t + 2 * m + 2 * t
    if kind == "flexswitch":
        return m, m + 6 * t + k * t // 16
    if kind == "dynamic":
        return m, m + 2 * t + k * t // 16
    return 2 * m + k * largest, m


def available_memory(device: torch.device) -> tuple[int, int]:
    """(free host RAM, free memory on ``device``) in bytes; on the CPU both are the RAM."""
    host = available_ram()
    if device.type == "cuda":
        return host, int(torch.cuda.mem_get_info(device)[0])
    return host, host


def available_ram() -> int:
    """Free host RAM in bytes (psutil's available memory, else the free pages)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def check_fits(method: Any, pool: Any, device: torch.device | str = "cpu",
               available: tuple[int, int] | None = None) -> None:
    """InsufficientMemoryError, before any merge, if the estimate exceeds what is free (on the
    CPU, host and device are the same RAM and their needs add up). ``available``: (host,
    device) bytes, measured when not given."""
    device = torch.device(device)
    host_need, device_need = estimate_footprint(method, pool)
    host_free, device_free = available_memory(device) if available is None else available
    name = getattr(method, "name", type(method).__name__)
    what = f"method {name!r} on {pool.backbone.name!r} with {len(pool.tasks)} tasks"
    if device.type == "cpu" or device.type == "mps":  # one memory (MPS shares the RAM)
        need = host_need + device_need
        if need > host_free:
            raise InsufficientMemoryError(f"{what} needs about {_gib(need)} of RAM for its weights, "
                                          f"{_gib(host_free)} is available; nothing was merged")
        return
    if host_need > host_free:
        raise InsufficientMemoryError(f"{what} needs about {_gib(host_need)} of RAM for its weights, "
                                      f"{_gib(host_free)} is available; nothing was merged")
    if device_need > device_free:
        raise InsufficientMemoryError(f"{what} needs about {_gib(device_need)} on {device} for its weights, "
                                      f"{_gib(device_free)} is free there; nothing was merged")


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB" if size >= 1024**3 else f"{size / 1024**2:.1f} MiB"
