"""Finding Hugging Face Hub repositories on this machine, or fetching them, without hanging.

With no network ``huggingface_hub`` retries for about half a minute before it gives up,
so each lookup first asks the local places (a ``--checkpoint-dir`` / ``--data-dir`` copy,
then the hub cache) and reaches for the network only after a quick probe of the hub's
host says it answers. A suite collects everything it is missing and reports it in one
:class:`~mergebench.backbone.MissingResourceError` that says how to provide each item.
"""
from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_by_choice() -> bool:
    """The user asked for no network (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@lru_cache(maxsize=8)
def _probe(endpoint: str) -> bool:
    """A TCP connection to the hub's host within PROBE_SECONDS (name lookup included)."""
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(PROBE_SECONDS)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    return not offline_by_choice() and _probe(_endpoint())


def cached_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: Sequence[str] | None = None) -> Path | None:
    """The local snapshot directory of a repository in the hub cache, or None (never the network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return path if path.is_dir() and any(path.iterdir()) else None


def download_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: Sequence[str] | None = None) -> Path:
    """Fetch a repository (only files matching ``allow_patterns``) into the hub cache."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns))
