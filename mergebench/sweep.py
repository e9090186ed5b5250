"""Sweeps: every (method, backbone, seed, grid point) as one Ray task.

The driver resolves every configuration before any work (a bad name or value fails at
once, naming it), prepares each backbone once (its manifest is part of the key), runs the
configurations not yet recorded as Ray tasks and is the only writer of records: each is
appended as its task finishes, so a crashed or interrupted sweep resumes where it stopped.
Ray is imported here only, when a sweep runs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mergebench.errors import HyperparameterError, MissingResourceError, NotApplicableError
from mergebench.manifest import prepare_checkpoints
from mergebench.registry import BACKBONES, METHODS
from mergebench.results import Result, append_result, check_writable, iter_records
from mergebench.runner import RunPlan, check_seed, execute, resolve


def configuration_key(method: str, backbone: str, seed: int, hyperparameters: dict[str, Any],
                      manifest: str | None, precision: str = "fp32", selection: dict[str, Any] | None = None,
                      protocol: str | None = None, batch_size: int | None = None) -> str:
    """What makes two runs the same run: a record with this key makes a sweep skip it.
    The precision is part of it (it changes the numbers); the device is not. The protocol is
    part of it (its evaluation details change the numbers, and a row is shown under it); a
    record that names none (written before protocols) is never taken for one that does. A
    tuned run (``selection``: on, size, seed, grid, and the split where it is a shipped one)
    is keyed by its grid and its fixed hyperparameters. The evaluation batch is part of it
    where it changes the numbers, i.e. for per-batch routing (``batch_size``, else None)."""
    content = {"method": method, "backbone": backbone, "seed": seed, "hyperparameters": hyperparameters,
               "checkpoint_manifest": manifest, "precision": precision, "protocol": protocol}
    if batch_size is not None:
        content["batch_size"] = batch_size
    if selection is not None:
        content["selection"] = {k: selection[k] for k in ("on", "size", "seed", "grid")}
        if selection.get("split", "train") != "train":  # a carved split's key is what it was before the field
            content["selection"]["split"] = selection["split"]
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def result_key(result: Result) -> str:
    if result.selection:
        fixed = {k: v for k, v in result.hyperparameters.items() if k not in result.selection["grid"]}
        return configuration_key(result.method, result.backbone, result.seed, fixed, result.checkpoint_manifest,
                                 result.precision, result.selection, result.protocol,
                                 keyed_batch_size(result.hyperparameters, result.batch_size))
    return configuration_key(result.method, result.backbone, result.seed, result.hyperparameters,
                             result.checkpoint_manifest, result.precision, protocol=result.protocol,
                             batch_size=keyed_batch_size(result.hyperparameters, result.batch_size))


def keyed_batch_size(hyperparameters: dict[str, Any], batch_size: int | None) -> int | None:
    """The evaluation batch where it changes the numbers (per-batch routing), else None."""
    return batch_size if hyperparameters.get("routing") == "per-batch" else None


def recorded_keys(results_dir: Path) -> set[str]:
    """The keys of every record under ``results_dir`` (none if it does not exist yet)."""
    if not Path(results_dir).is_dir():
        return set()
    return {result_key(result) for _, result in iter_records(Path(results_dir))}


@dataclass(frozen=True)
class Configuration:
    """One resolved point of a sweep and its key."""

    plan: RunPlan
    key: str
    hyperparameters: dict[str, Any]  # resolved: as the record will name them
    manifest: str | None = None  # SHA-256 of the backbone's checkpoint manifest, part of the key

    @property
    def label(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in sorted(self.hyperparameters.items()))
        return (f"{self.plan.method.name} on {self.plan.backbone_class.name}, seed {self.plan.seed}, protocol "
                f"{self.plan.protocol.name}" + (f" ({values})" if values else ""))


def grid_points(method: str, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid keys ``method`` declares (one empty point if none)."""
    known = METHODS.get(method).hyperparameters
    keys = [key for key in grid if key in known]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def plan_sweep(methods: list[str], backbones: list[str], seeds: list[int], grid: dict[str, list[Any]], *,
               batch_size: int | None = None, checkpoint_dir: Path | None = None, data_dir: Path | None = None,
               device: str = "cpu", precision: str = "fp32", skipped: list[str] | None = None,
               protocols: list[str] | None = None, workers: int | None = None,
               cache_mb: float | None = None) -> list[Configuration]:
    """Every configuration resolved, each backbone prepared once; raises for the first bad
    name or value before any merge. A method not applicable to a backbone is left out
    (its message goes to ``skipped``); a grid key no selected method has is an error.
    ``protocols`` (default ``original``) is one more axis; grid values override each."""
    from mergebench.protocols import get_protocol

    chosen = [get_protocol(name) for name in (protocols or [None])]
    for name in methods:
        METHODS.get(name)
    for name in backbones:
        BACKBONES.get(name)
    for seed in seeds:
        check_seed(seed)
    unused = set(grid) - {key for name in methods for key in METHODS.get(name).hyperparameters}
    if unused:
        raise HyperparameterError(f"no selected method has hyperparameter {', '.join(sorted(unused))}")
    plans = []
    for protocol, backbone, method, seed in itertools.product(chosen, backbones, methods, seeds):
        for point in grid_points(method, grid):
            try:
                plans.append(resolve(method, backbone, seed=seed, hyperparameters=point, batch_size=batch_size,
                                     checkpoint_dir=checkpoint_dir, data_dir=data_dir, device=device,
                                     precision=precision, protocol=protocol, workers=workers, cache_mb=cache_mb))
            except NotApplicableError as error:
                if skipped is not None and str(error) not in skipped:
                    skipped.append(str(error))
    manifests: dict[str, str | None] = {}
    configurations: dict[str, Configuration] = {}
    for plan in plans:
        backbone = plan.make_backbone()
        if backbone.name not in manifests:  # the manifest is part of the key: prepared here, once
            manifests[backbone.name] = prepare_checkpoints(backbone, repair=False).sha256
        resolved = plan.method.resolved_hyperparameters(backbone)
        key = configuration_key(plan.method.name, backbone.name, plan.seed, json.loads(json.dumps(resolved)),
                                manifests[backbone.name], plan.precision, protocol=plan.protocol.name,
                                batch_size=keyed_batch_size(resolved, plan.batch_size))
        configurations.setdefault(key, Configuration(plan, key, resolved, manifests[backbone.name]))
    return list(configurations.values())


@dataclass
class SweepReport:
    recorded: list[Result] = field(default_factory=list)
    skipped: int = 0  # already recorded before this sweep
    failed: list[tuple[Configuration, str]] = field(default_factory=list)


def _execute(plan: RunPlan, threads: int = 1) -> Result:
    """The body of one Ray task (module level, so workers import it rather than unpickle it),
    on as many torch threads as CPUs Ray gave it: runs side by side never oversubscribe the cores."""
    import torch

    torch.set_num_threads(threads)
    return execute(plan)


def require_ray() -> None:
    """MissingResourceError saying how to install Ray, before any work, if it is missing."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise MissingResourceError("mergebench sweep runs on Ray, which is not installed: "
                                   "pip install 'mergebench[ray]' (or pip install 'ray>=2.40')") from None


def start_ray(address: str | None = None) -> bool:
    """Connect to ``address``, or start Ray embedded on this machine's cores; False if Ray
    was already running in this process (then the caller leaves it running)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def check_devices(configurations: list[Configuration], gpus_per_run: float) -> None:
    """A run on a GPU gets it from Ray, which shows each task its GPUs as cuda:0, cuda:1, ...:
    HyperparameterError unless every such run asks for a GPU Ray can give it."""
    for configuration in configurations:
        device = configuration.plan.device
        if device.type == "cuda" and (gpus_per_run <= 0 or (device.index or 0) >= max(1, int(gpus_per_run))):
            raise HyperparameterError(f"--device {device}: a sweep's runs get their GPUs from Ray; use --device cuda "
                                      f"with --gpus-per-run 1 or more (got --gpus-per-run {gpus_per_run:g})")


def _error_text(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the task's own exception
    return f"{type(cause).__name__}: {cause}"


def run_sweep(configurations: Iterable[Configuration], results_dir: Path, *, cpus_per_run: float = 1,
              gpus_per_run: float = 0, address: str | None = None, progress: bool = True) -> SweepReport:
    """Run every configuration not yet recorded under ``results_dir`` as a Ray task and
    append each record as it arrives. A failing configuration is reported, not raised;
    Ctrl-C cancels what has not finished and keeps what was recorded."""
    import ray
    from tqdm import tqdm

    configurations = list(configurations)
    check_devices(configurations, gpus_per_run)
    results_dir = check_writable(Path(results_dir))
    done = recorded_keys(results_dir)
    pending = [c for c in configurations if c.key not in done]
    report = SweepReport(skipped=len(configurations) - len(pending))
    if not pending:
        return report
    started = start_ray(address)
    try:
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(_execute)
        threads = max(1, int(cpus_per_run))
        running = {task.remote(c.plan, threads): c for c in pending}
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_run, 1e-9)))
        bar = tqdm(total=len(pending), desc="sweep", unit="run", disable=not progress, file=sys.stderr)
        try:
            while running:
                bar.set_postfix(running=min(slots, len(running)), failed=len(report.failed))
                ready, _ = ray.wait(list(running), num_returns=1)
                configuration = running.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                    append_result(results_dir, result)
                    report.recorded.append(result)
                except Exception as error:  # the task's error, or a record that could not be written
                    report.failed.append((configuration, _error_text(error)))
                bar.update(1)
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.set_postfix(running=0, failed=len(report.failed))
            bar.close()
    finally:
        if started:
            ray.shutdown()
    return report


# --- selection on a validation split (--select-on validation) ------------------------------

@dataclass(frozen=True)
class SelectionGroup:
    """The grid points of one (protocol, method, backbone, seed), tuned together: one record."""

    configurations: list[Configuration]
    key: str
    selection: dict[str, Any]  # on, split, size (sizes: of a shipped split), seed, grid

    @property
    def label(self) -> str:
        plan = self.configurations[0].plan
        grid = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in sorted(self.selection["grid"].items()))
        return (f"{plan.method.name} on {plan.backbone_class.name}, seed {plan.seed}, protocol {plan.protocol.name}, "
                f"tuned on validation" + (f" ({grid})" if grid else ""))


def plan_selection(configurations: list[Configuration], grid: dict[str, list[Any]], size: int,
                   seed: int) -> list[SelectionGroup]:
    """The configurations of ``plan_sweep`` grouped by (protocol, method, backbone, seed), each group
    keyed by its grid, its fixed hyperparameters and the validation split (which, its size and seed)."""
    from mergebench.selection import check_selection, validation_split

    size, seed = check_selection(size, seed)
    groups: dict[tuple, list[Configuration]] = {}
    for configuration in configurations:
        plan = configuration.plan
        groups.setdefault((plan.protocol.name, plan.method.name, plan.backbone_class.name, plan.seed),
                          []).append(configuration)
    planned = []
    for members in groups.values():
        keys = [k for k in grid if k in members[0].hyperparameters]
        values = {k: list(dict.fromkeys(json.dumps(c.hyperparameters[k]) for c in members)) for k in keys}
        first = members[0]
        backbone = first.plan.make_backbone()
        selection = {"on": "validation", **validation_split(backbone, first.plan.task_names(backbone), size),
                     "seed": seed, "grid": {k: [json.loads(v) for v in vs] for k, vs in values.items()}}
        fixed = {k: v for k, v in json.loads(json.dumps(first.hyperparameters)).items() if k not in keys}
        key = configuration_key(first.plan.method.name, first.plan.backbone_class.name, first.plan.seed, fixed,
                                first.manifest, first.plan.precision, selection, first.plan.protocol.name,
                                keyed_batch_size(first.hyperparameters, first.plan.batch_size))
        planned.append(SelectionGroup(members, key, selection))
    return planned


def run_selection(groups: Iterable[SelectionGroup], results_dir: Path, *, progress: bool = True) -> SweepReport:
    """For each group not yet recorded: every grid point merged and scored on the validation
    split (never the test split), the best run as usual on the test split and recorded with
    its ``selection``. Runs in this process, one after another; a failing group is reported."""
    from tqdm import tqdm

    from mergebench.selection import select

    groups = list(groups)
    results_dir = check_writable(Path(results_dir))
    done = recorded_keys(results_dir)
    pending = [g for g in groups if g.key not in done]
    report = SweepReport(skipped=len(groups) - len(pending))
    for group in tqdm(pending, desc="select", unit="group", disable=not progress, file=sys.stderr):
        try:
            chosen = select(group.configurations, group.selection["size"], group.selection["seed"],
                            group.selection["split"])
            result = execute(chosen.chosen.plan)  # the only read of the test split
            result.selection = {**group.selection, "validation_average": chosen.validation_average,
                                "points": [{"hyperparameters": json.loads(json.dumps(point)), "validation_average": a}
                                           for point, a in chosen.averages]}
            append_result(results_dir, result)
            report.recorded.append(result)
        except Exception as error:
            report.failed.append((group, _error_text(error)))
    return report
