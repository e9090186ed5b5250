"""Finding Hugging Face Hub repositories on this machine, or fetching them, without hanging.

With no network ``huggingface_hub`` (and ``datasets.load_dataset`` even more so) retries
for about half a minute before it gives up. So a lookup first asks the hub cache
(``local_files_only``, never the network), and reaches for the network only when no
offline flag is set and a TCP probe of the hub's host answers within ``PROBE_SECONDS``
(name lookup included; skipped behind a proxy, where a direct connection says nothing).
Models and datasets alike are fetched with ``snapshot_download`` (a dataset as its
parquet files). A failure is a :class:`~mergebench.errors.MissingResourceError` that
names the repository, why the hub cannot be used, and how to provide the files locally.
"""
from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from mergebench.errors import MissingResourceError

PROBE_SECONDS = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = {"1", "true", "yes", "on"}


def offline_reason() -> str | None:
    """Which offline flag the user set (now, or ``HF_HUB_OFFLINE`` when huggingface_hub was
    imported, which huggingface_hub itself obeys), or None."""
    from huggingface_hub import constants

    flags = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in _TRUE]
    if flags:
        return f"offline mode: {' and '.join(flags)} {'is' if len(flags) == 1 else 'are'} set"
    if constants.HF_HUB_OFFLINE:
        return "offline mode: HF_HUB_OFFLINE was set when huggingface_hub was imported"
    return None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@lru_cache(maxsize=8)
def probe(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None if a TCP connection to the endpoint's host opens within ``timeout`` seconds,
    else why not. Remembered per endpoint, so one process probes once."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    failure: list[str] = ["no answer within {:g} s".format(timeout)]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            failure.clear()
        except OSError as error:
            failure[0] = str(error) or type(error).__name__

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return f"no connection to {host}:{port} ({failure[0]})" if failure else None


def unreachable_reason() -> str | None:
    """Why the hub cannot be used now (an offline flag, or the probe failed), or None."""
    reason = offline_reason()
    if reason is not None:
        return reason
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None  # only the proxy knows; huggingface_hub's own errors will tell
    return probe(hub_endpoint())


def hub_reachable() -> bool:
    return unreachable_reason() is None


def list_files(folder: Path) -> list[str]:
    """Paths (with "/") of the files under ``folder``, relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def cached_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: Sequence[str] | None = None) -> Path | None:
    """The local snapshot directory of a repository in the hub cache, or None (never the network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None
    return path if path.is_dir() and any(path.iterdir()) else None


def download_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: Sequence[str] | None = None) -> Path:
    """Fetch a repository (only files matching ``allow_patterns``) into the hub cache.
    Callers check :func:`unreachable_reason` first, so this does not hang offline."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns))


def snapshot(
    repo_id: str,
    *,
    repo_type: str = "model",
    select: Callable[[list[str]], list[str] | None],
    what: str,
    local_hint: str,
) -> Path:
    """The local folder of a hub repository holding the files that ``select`` picks,
    downloaded into the hub cache if they are not there yet.

    ``select(paths)`` gets the repository's file paths and returns those needed, or None
    if what is needed is not among them; it is applied to the cached copy first, then to
    the repository's listing. ``what`` names the resource and ``local_hint`` says how to
    provide it without the hub; both go into the error message.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = cached_snapshot(repo_id, repo_type)
    if cached is not None and select(list_files(cached)):
        return cached

    def missing(reason: str) -> MissingResourceError:
        return MissingResourceError(
            f"{what} is not on this machine and cannot be downloaded from the Hugging Face Hub "
            f"({repo_type} {repo_id!r}: {reason}). {local_hint}"
        )

    reason = unreachable_reason()
    if reason is not None:
        raise missing(reason)
    try:
        wanted = select(HfApi().list_repo_files(repo_id, repo_type=repo_type))
        if not wanted:
            raise missing("the repository does not hold it")
        return download_snapshot(repo_id, repo_type, wanted)
    except MissingResourceError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise missing(f"{type(error).__name__}: {first_line}") from error
