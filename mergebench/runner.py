"""One benchmark run as stages that the CLI, benchmarks and sweeps call directly:
resolve (every value checked, nothing done) -> load_pool -> exemplars_for -> timed_merge
-> timed_evaluate -> make_result -> append_result. ``execute`` runs the work stages of a
resolved plan; ``run`` composes all of them."""
from __future__ import annotations

import platform
import random
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mergebench.backbone import Backbone
from mergebench.device import check_precision, describe_device, resolve_device
from mergebench.bootstrap import Sample, suite_interval
from mergebench.evaluate import evaluate
from mergebench.exemplars import draw_exemplars
from mergebench.manifest import prepare_checkpoints
from mergebench.errors import HyperparameterError, NonFiniteError
from mergebench.memory import PeakMemory, check_fits
from mergebench.method import Merged, Method
from mergebench.pool import ModelPool
from mergebench.protocols import Protocol, get_protocol, resolve_hyperparameters
from mergebench.registry import BACKBONES, METHODS
from mergebench.results import Result, append_result, check_writable

# every package whose version can change a recorded number (those not installed are left out)
PACKAGES = ("mergebench", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn", "datasets",
            "open_clip_torch", "timm", "pycocotools", "Pillow")
# files a run itself writes: changes to them do not make the code that ran "dirty"
RUN_OUTPUTS = ("results", "leaderboard.md", "leaderboard-*.png")


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


def make_method(name: str, hyperparameters: dict[str, Any] | None = None, seed: int = 0,
                explicit: Any = None) -> Method:
    """The method with its hyperparameters checked (HyperparameterError before any work).
    ``explicit``: the names the user set (``Method.overrides``); None: all of ``hyperparameters``.
    A protocol's values are not the user's: a method that adapts a default to a backbone
    (FlexSwitch's loss on a detector) still may."""
    method = METHODS.get(name)(**(hyperparameters or {}))
    if explicit is not None:
        method.overrides = {key: method.hparams[key] for key in explicit}
    method.seed = check_seed(seed)
    return method


def check_seed(seed: Any) -> int:
    """A seed numpy, torch and Python all accept: an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise HyperparameterError(f"--seed {seed!r} is not allowed; expected an integer in [0, {2**32 - 1}]")
    return seed


def check_workers(workers: Any) -> int | None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise HyperparameterError(f"--num-workers {workers!r} is not allowed; expected an integer >= 0")
    return workers


def check_cache_mb(cache_mb: Any) -> float | None:
    if cache_mb is not None and (isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float))
                                 or not cache_mb >= 0 or cache_mb == float("inf")):
        raise HyperparameterError(f"--cache-mb {cache_mb!r} is not allowed; expected a number of MiB >= 0")
    return cache_mb


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HyperparameterError(f"--batch-size {batch_size!r} is not allowed; expected an integer >= 1")
    return batch_size


@dataclass(frozen=True)
class RunPlan:
    """One run resolved before any work: the method made once with its checked values, the
    backbone class it applies to, and where the record goes (None: nowhere)."""

    method: Method
    backbone_class: type[Backbone]
    seed: int = 0
    batch_size: int = 64
    results_dir: Path | None = None
    checkpoint_dir: Path | None = None
    data_dir: Path | None = None
    commit: str | None = None  # the code that runs: the checkout as it was when the run was resolved
    device: torch.device = torch.device("cpu")  # where evaluation runs (merging stays on the CPU)
    precision: str = "fp32"  # evaluation's autocast precision: fp32, bf16 or fp16
    protocol: Protocol = get_protocol(None)  # the named setting the method's values come from
    overrides: tuple[str, ...] = ()  # hyperparameters set explicitly over the protocol
    workers: int | None = None  # evaluation's DataLoader processes (None: mergebench.loading.default_workers)
    cache_mb: float | None = None  # dynamic methods' merged-weight cache budget (None: ComposedMerged's default)

    @property
    def test_limit(self) -> int | None:
        """The protocol's cap on the test examples scored per task of this backbone's suite."""
        return self.protocol.test_limit(self.backbone_class.suite)

    def task_names(self, backbone: Backbone) -> list[str]:
        """The backbone's tasks this run merges and scores: all, less those the protocol leaves out."""
        left_out = self.protocol.tasks_left_out(self.backbone_class.suite)
        return [task.name for task in backbone.tasks if task.name not in left_out]

    def make_backbone(self) -> Backbone:
        return self.backbone_class(checkpoint_dir=self.checkpoint_dir, data_dir=self.data_dir)


def resolve(
    method_name: str,
    backbone_name: str,
    *,
    seed: int = 0,
    hyperparameters: dict[str, Any] | None = None,
    batch_size: int | None = None,
    results_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    data_dir: Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    protocol: str | Protocol | None = None,
    workers: int | None = None,
    cache_mb: float | None = None,
) -> RunPlan:
    """Check every name and value before any work: unknown names and bad values raise
    UnknownNameError / HyperparameterError, a method that cannot merge the backbone's tasks
    NotApplicableError, an unwritable ``results_dir`` ResultsWriteError, a device this machine
    lacks (or a precision it cannot run there) HyperparameterError. The method's values are
    its defaults, then the ``protocol``'s (default ``original``), then ``hyperparameters``,
    which the record names as overrides of the protocol. ``batch_size`` None: the protocol's
    evaluation batch (64 unless it sets one)."""
    commit = git_commit()  # the code that runs is the code at the start, whatever is committed meanwhile
    protocol = get_protocol(protocol)
    declared = METHODS.get(method_name).hyperparameters
    method = make_method(method_name, resolve_hyperparameters(protocol, method_name, hyperparameters, declared), seed,
                         explicit=list(hyperparameters or {}))
    batch_size = check_batch_size(protocol.eval_batch_size if batch_size is None else batch_size)
    resolved_device = resolve_device(device)
    precision = check_precision(precision, resolved_device)
    method.device, method.precision = resolved_device, precision  # data-dependent methods' forward passes
    backbone_class = BACKBONES.get(backbone_name)
    method.check_applicable(backbone_class)
    if results_dir is not None:
        results_dir = check_writable(Path(results_dir))
    return RunPlan(method, backbone_class, seed, batch_size, results_dir, checkpoint_dir, data_dir, commit,
                   resolved_device, precision, protocol, tuple(hyperparameters or {}), check_workers(workers),
                   check_cache_mb(cache_mb))


def load_pool(backbone: Backbone, tasks: list[str] | None = None) -> ModelPool:
    """The backbone's checkpoints as a pool, each verified against the prepare manifest. A
    corrupt checkpoint stops the run (``repair=False``) rather than being rebuilt under it."""
    prepare_checkpoints(backbone, repair=False)
    return ModelPool(backbone, tasks)


def exemplars_for(method: Method, backbone: Backbone, tasks: list[str], seed: int) -> dict[str, Any] | None:
    """The exemplars ``method`` asks for (None if it asks for none). AdaMerging's protocol
    adapts on unlabelled *test* inputs; the record says so (``uses_test_inputs``)."""
    if not method.needs_exemplars:
        return None
    split = "test" if method.uses_test_inputs else "train"
    return draw_exemplars(backbone, tasks, method.exemplars_per_task, seed, split)


def timed_merge(method: Method, pool: ModelPool, exemplars: dict[str, Any] | None = None) -> tuple[Merged, float]:
    """``method.merge`` and its wall seconds."""
    start = time.perf_counter()
    merged = method.merge(pool, exemplars)
    return merged, time.perf_counter() - start


def timed_evaluate(merged: Merged, backbone: Backbone, tasks: list[str], batch_size: int,
                   device: torch.device | str = "cpu", precision: str = "fp32", *, test_limit: int | None = None,
                   scored: dict[str, int] | None = None, workers: int | None = None,
                   samples: dict[str, Sample | None] | None = None) -> tuple[dict[str, float], float]:
    """The metric of every task on its test split (its first ``test_limit`` examples, in the
    split's order, when given), evaluated on ``device`` under ``precision``, and the wall
    seconds it took (moving the model to the device included). ``scored``, when given, gets
    each task's count of examples scored; ``samples`` its per-example predictions and labels."""
    start = time.perf_counter()
    merged.to(device)
    limited = [backbone.task(task).limited(test_limit) for task in tasks]
    metrics = evaluate(merged, limited, batch_size, precision, workers, samples)
    if scored is not None:
        scored.update({task.name: task.test_scored for task in limited})
    return metrics, time.perf_counter() - start


def make_result(plan: RunPlan, backbone: Backbone, merged: Merged, metrics: dict[str, float], *, storage_bytes: int,
                merge_seconds: float, eval_seconds: float, peak_bytes: int, manifest: str | None,
                examples: dict[str, int] | None = None, interval: dict[str, Any] | None = None) -> Result:
    """The record of one run, with what the run cost and which code, packages and checkpoints made it."""
    method = plan.method
    reused = getattr(merged, "reused_training_seconds", None)
    return Result(
        method=method.name,
        backbone=backbone.name,
        suite=backbone.suite,
        seed=plan.seed,
        hyperparameters=method.resolved_hyperparameters(backbone),  # every value as used, defaults included
        metrics=metrics,
        average=float(np.mean(list(metrics.values()))),
        extra_storage_bytes=storage_bytes,
        merge_seconds=merge_seconds,
        training_seconds=merge_seconds + (reused or 0.0),
        reused=reused is not None,
        eval_seconds=eval_seconds,
        peak_rss_bytes=peak_bytes,
        exemplars_per_task=method.exemplars_per_task,
        automatic=method.automatic,
        dynamic=method.dynamic,
        uses_test_inputs=method.uses_test_inputs,
        reference=method.reference,
        checkpoint_family=backbone.checkpoint_family,
        checkpoint_manifest=manifest,
        data_manifest=backbone.data_manifest_hash(),
        diagnostics=merged.diagnostics(),
        versions=package_versions(),
        git_commit=plan.commit,
        device=describe_device(plan.device),
        precision=plan.precision,
        protocol=plan.protocol.name,
        overrides=list(plan.overrides),
        examples=examples,
        interval=interval,
        batch_size=plan.batch_size,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def execute(plan: RunPlan, keep: Callable[[Merged, ModelPool], Any] | None = None) -> Result:
    """The work of a resolved run: load the pool, draw exemplars, merge, evaluate; the Result,
    not yet recorded. Peak memory is this run's alone. A non-finite merged tensor, output or
    metric stops the run with a NonFiniteError naming the method, task and tensor. ``keep``
    receives the evaluated model and its pool (``run --save-merged`` exports it)."""
    method = plan.method
    backbone = plan.make_backbone()
    tasks = plan.task_names(backbone)
    with load_pool(backbone, tasks) as pool, PeakMemory() as peak:
        check_fits(method, pool, plan.device)  # a method that cannot fit says so before any work, exemplars included
        seed_everything(plan.seed)
        exemplars = exemplars_for(method, backbone, tasks, plan.seed)
        try:
            merged, merge_seconds = timed_merge(method, pool, exemplars)
            if plan.cache_mb is not None and hasattr(merged, "cache_bytes"):  # a dynamic method's composed weights
                merged.cache_bytes = int(plan.cache_mb * 2**20)
            storage = merged.storage_bytes()
            scored: dict[str, int] = {}
            samples: dict[str, Sample | None] = {}
            metrics, eval_seconds = timed_evaluate(merged, backbone, tasks, plan.batch_size, plan.device, plan.precision,
                                                   test_limit=plan.test_limit, scored=scored, workers=plan.workers,
                                                   samples=samples)
        except NonFiniteError as error:
            raise NonFiniteError(f"method {method.name!r} on {backbone.name!r}: {error}; nothing recorded") from None
        manifest = pool.manifest_sha256
    if keep is not None:
        keep(merged, pool)
    return make_result(plan, backbone, merged, metrics, storage_bytes=storage, merge_seconds=merge_seconds,
                       eval_seconds=eval_seconds, peak_bytes=peak.bytes, manifest=manifest, examples=scored,
                       interval=suite_interval(samples, metrics))


def run(
    method_name: str,
    backbone_name: str,
    *,
    seed: int = 0,
    hyperparameters: dict[str, Any] | None = None,
    results_dir: Path | None = Path("results"),
    batch_size: int | None = None,
    checkpoint_dir: Path | None = None,
    data_dir: Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    protocol: str | Protocol | None = None,
    workers: int | None = None,
    cache_mb: float | None = None,
) -> Result:
    """resolve, execute and (with ``results_dir``) append the record. Every value is checked
    before any work; a run that fails records nothing."""
    plan = resolve(method_name, backbone_name, seed=seed, hyperparameters=hyperparameters, batch_size=batch_size,
                   results_dir=results_dir, checkpoint_dir=checkpoint_dir, data_dir=data_dir, device=device,
                   precision=precision, protocol=protocol, workers=workers, cache_mb=cache_mb)
    result = execute(plan)
    if plan.results_dir is not None:
        append_result(plan.results_dir, result)
    return result
