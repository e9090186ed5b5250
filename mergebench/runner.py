"""One benchmark run: resolve plugins, merge, evaluate, record."""
from __future__ import annotations

import platform
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergebench.backbone import Backbone
from mergebench.evaluate import evaluate
from mergebench.method import Method
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES, METHODS
from mergebench.results import Result, append_result

PACKAGES = ("mergebench", "torch", "transformers", "safetensors", "numpy")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the mergebench checkout this code runs from (None if not a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def draw_exemplars(backbone: Backbone, tasks: list[str], n: int, seed: int, split: str = "train") -> dict[str, Any]:
    """The same seeded, label-free exemplars for every method asking for ``n`` per task."""
    return {task: backbone.exemplars(task, n, seed, split) for task in tasks}


def make_method(name: str, hyperparameters: dict[str, Any] | None = None, seed: int = 0) -> Method:
    method = METHODS.get(name)(**(hyperparameters or {}))
    method.seed = seed
    return method


def run(
    method_name: str,
    backbone_name: str,
    *,
    seed: int = 0,
    hyperparameters: dict[str, Any] | None = None,
    results_dir: Path | None = Path("results"),
    batch_size: int = 64,
    checkpoint_dir: Path | None = None,
    data_dir: Path | None = None,
) -> Result:
    commit = git_commit()  # the code that runs is the code at the start, whatever is committed meanwhile
    method = make_method(method_name, hyperparameters, seed)
    backbone: Backbone = BACKBONES.get(backbone_name)(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
    backbone.prepare()
    tasks = [task.name for task in backbone.tasks]
    seed_everything(seed)

    with ModelPool(backbone, tasks) as pool:
        # AdaMerging's protocol adapts on unlabelled *test* inputs; the record says so (uses_test_inputs)
        split = "test" if method.uses_test_inputs else "train"
        exemplars = draw_exemplars(backbone, tasks, method.exemplars_per_task, seed, split) if method.needs_exemplars else None
        start = time.perf_counter()
        merged = method.merge(pool, exemplars)
        merge_seconds = time.perf_counter() - start
        storage = merged.storage_bytes()

        start = time.perf_counter()
        metrics = evaluate(merged, backbone, tasks, batch_size)
        eval_seconds = time.perf_counter() - start

    result = Result(
        method=method.name,
        backbone=backbone.name,
        suite=backbone.suite,
        seed=seed,
        hyperparameters=method.hparams,
        metrics=metrics,
        average=float(np.mean(list(metrics.values()))),
        extra_storage_bytes=storage,
        merge_seconds=merge_seconds,
        eval_seconds=eval_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        exemplars_per_task=method.exemplars_per_task,
        automatic=method.automatic,
        dynamic=method.dynamic,
        uses_test_inputs=method.uses_test_inputs,
        reference=method.reference,
        checkpoint_family=backbone.checkpoint_family,
        diagnostics=merged.diagnostics(),
        versions=package_versions(),
        git_commit=commit,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if results_dir is not None:
        append_result(Path(results_dir), result)
    return result
