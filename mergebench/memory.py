"""Peak memory of one piece of work, not of the whole process.

``ru_maxrss`` is the process's high-water mark: in a run of several methods the
second would inherit the first one's peak. On Linux the kernel's peak resident set
size can be reset (``/proc/self/clear_refs``, value 5) and read back (``VmHWM``),
which measures exactly one method's peak at no cost. Where that is not possible the
tracker samples the resident set size in a background thread (a lower bound between
samples) and says so in ``scope``.
"""
from __future__ import annotations

import re
import resource
import sys
import threading
from pathlib import Path

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
