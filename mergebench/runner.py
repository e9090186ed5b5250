"""One benchmark run: resolve plugins, merge, evaluate, record."""
from __future__ import annotations

import platform
import random
import subprocess
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergebench.backbone import Backbone
from mergebench.evaluate import evaluate
from mergebench.exemplars import draw_exemplars
from mergebench.manifest import prepare_checkpoints
from mergebench.errors import HyperparameterError, NonFiniteError
from mergebench.memory import PeakMemory
from mergebench.method import Method
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES, METHODS
from mergebench.results import Result, append_result, check_writable

# every package whose version can change a recorded number (those not installed are left out)
PACKAGES = ("mergebench", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn", "datasets",
            "open_clip_torch", "timm", "pycocotools", "Pillow")
# files a run itself writes: changes to them do not make the code that ran "dirty"
RUN_OUTPUTS = ("results", "leaderboard.md")


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


def git_commit(here: Path | None = None) -> str | None:
    """The commit of the mergebench checkout this code runs from (or of ``here``), ``-dirty``
    when tracked source differs from it (None if not a git checkout). Records and the
    leaderboard that runs write are not source, so writing them never marks the next run dirty."""
    here = here or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        excluded = [f":(top,exclude){path}" for path in RUN_OUTPUTS]
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded)
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def make_method(name: str, hyperparameters: dict[str, Any] | None = None, seed: int = 0) -> Method:
    """The method with its hyperparameters checked (HyperparameterError before any work)."""
    method = METHODS.get(name)(**(hyperparameters or {}))
    method.seed = check_seed(seed)
    return method


def check_seed(seed: Any) -> int:
    """A seed numpy, torch and Python all accept: an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise HyperparameterError(f"--seed {seed!r} is not allowed; expected an integer in [0, {2**32 - 1}]")
    return seed


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HyperparameterError(f"--batch-size {batch_size!r} is not allowed; expected an integer >= 1")
    return batch_size


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
    """Merge, evaluate and (with ``results_dir``) append one record. Every value is checked
    before any work; a non-finite merged tensor, output or metric stops the run with a
    NonFiniteError naming the method, task and tensor, and nothing is recorded."""
    commit = git_commit()  # the code that runs is the code at the start, whatever is committed meanwhile
    method = make_method(method_name, hyperparameters, seed)
    batch_size = check_batch_size(batch_size)
    backbone_class = BACKBONES.get(backbone_name)
    method.check_applicable(backbone_class)  # before any work: NotApplicableError, nothing recorded
    if results_dir is not None:
        check_writable(Path(results_dir))
    backbone: Backbone = backbone_class(checkpoint_dir=checkpoint_dir, data_dir=data_dir)
    prepare_checkpoints(backbone, repair=False)  # a corrupt checkpoint stops the run: nothing recorded
    tasks = [task.name for task in backbone.tasks]
    seed_everything(seed)

    with PeakMemory() as peak, ModelPool(backbone, tasks) as pool:
        # AdaMerging's protocol adapts on unlabelled *test* inputs; the record says so (uses_test_inputs)
        split = "test" if method.uses_test_inputs else "train"
        exemplars = draw_exemplars(backbone, tasks, method.exemplars_per_task, seed, split) if method.needs_exemplars else None
        try:
            start = time.perf_counter()
            merged = method.merge(pool, exemplars)
            merge_seconds = time.perf_counter() - start
            storage = merged.storage_bytes()

            start = time.perf_counter()
            metrics = evaluate(merged, [backbone.task(task) for task in tasks], batch_size)
            eval_seconds = time.perf_counter() - start
        except NonFiniteError as error:
            raise NonFiniteError(f"method {method.name!r} on {backbone.name!r}: {error}; nothing recorded") from None
        manifest = pool.manifest_sha256

    reused = getattr(merged, "reused_training_seconds", None)
    result = Result(
        method=method.name,
        backbone=backbone.name,
        suite=backbone.suite,
        seed=seed,
        hyperparameters=method.resolved_hyperparameters(backbone),  # every value as used, defaults included
        metrics=metrics,
        average=float(np.mean(list(metrics.values()))),
        extra_storage_bytes=storage,
        merge_seconds=merge_seconds,
        training_seconds=merge_seconds + (reused or 0.0),
        reused=reused is not None,
        eval_seconds=eval_seconds,
        peak_rss_bytes=peak.bytes,
        exemplars_per_task=method.exemplars_per_task,
        automatic=method.automatic,
        dynamic=method.dynamic,
        uses_test_inputs=method.uses_test_inputs,
        reference=method.reference,
        checkpoint_family=backbone.checkpoint_family,
        checkpoint_manifest=manifest,
        diagnostics=merged.diagnostics(),
        versions=package_versions(),
        git_commit=commit,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if results_dir is not None:
        append_result(Path(results_dir), result)
    return result
