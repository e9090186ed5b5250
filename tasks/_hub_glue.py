"""Fetching from the Hugging Face Hub without ever hanging.

``huggingface_hub.snapshot_download`` is used for models *and* datasets (a dataset repo is
fetched as its parquet files), because it fails within about a second when the hub
cannot be resolved, whereas ``datasets.load_dataset`` retries for half a minute. What is
already in the local hub cache is used without touching the network; otherwise a
socket probe of the endpoint (a few seconds at most, skipped behind a proxy) comes
first, so a firewalled machine fails fast too. Every failure is a
:class:`MissingResourceError` that names the repository and the local alternative.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from mergebench.backbone import MissingResourceError

PROBE_TIMEOUT_SECONDS = 5.0
_TRUE = {"1", "true", "yes", "on"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    from_env = any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return from_env or bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """None if a TCP connection to the hub endpoint opens, else the reason it does not.
    Behind a proxy the direct probe says nothing, so it is skipped (None)."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    url = urlparse(endpoint or hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"cannot connect to {host}:{port} ({error})"


def list_files(folder: Path) -> list[str]:
    """Paths (with "/") of the files under ``folder``, relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


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
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cached = Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
        if select(list_files(cached)):
            return cached
    except (LocalEntryNotFoundError, OSError):
        pass

    def missing(reason: str) -> MissingResourceError:
        return MissingResourceError(
            f"{what} is not on this machine and cannot be downloaded from the Hugging Face Hub "
            f"({repo_type} {repo_id!r}: {reason}). {local_hint}"
        )

    if hub_offline():
        raise missing("offline mode, HF_HUB_OFFLINE is set")
    reason = hub_reachable()
    if reason:
        raise missing(reason)
    try:
        wanted = select(HfApi().list_repo_files(repo_id, repo_type=repo_type))
        if not wanted:
            raise missing("the repository does not hold it")
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=wanted))
    except MissingResourceError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise missing(f"{type(error).__name__}: {first_line}") from error
