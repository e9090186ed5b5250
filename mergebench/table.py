"""Tables of results, printed after a run and written to leaderboard.md."""
from __future__ import annotations

import dataclasses
import json
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Any, Collection

from tabulate import tabulate

from mergebench.errors import RecordError
from mergebench.protocols import PROTOCOLS
from mergebench.registry import BACKBONES, METHODS
from mergebench.results import NO_PROTOCOL, Result, iter_records, to_frame

MB = 1_000_000


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _storage(result: Result) -> str:
    if not result.extra_storage_bytes:
        return "-"
    # a spread that rounds to 0.00 MB (container headers differing by a few bytes) is not shown
    spread = f"{getattr(result, 'storage_std', 0.0) / MB:.2f}"
    return f"{result.extra_storage_bytes / MB:.2f}" + (f" ± {spread}" if float(spread) else "")


def _automatic(result: Result) -> str:
    if result.hyperparameters.get("routing") == "per-batch":
        return "no (batch)"  # routed by the batch it sits in, which evaluation draws from one task
    return ("yes" if result.automatic else "no") if result.dynamic and not result.reference else "-"


def _exemplars(result: Result) -> str:
    if result.uses_test_inputs:
        return f"{result.exemplars_per_task} test inputs"
    return str(result.exemplars_per_task) if result.exemplars_per_task else "-"


SINGLE_TASK_BATCHES = "uses single-task batches"  # per-batch routing: not automatic in deployment


def _method(result: Result, unknown: bool) -> str:
    """The method's name, marked when unknown, not in fp32, or routed per single-task batch."""
    label = f"{result.method} (unknown method)" if unknown else result.method
    if result.hyperparameters.get("routing") == "per-batch":
        label += f" ({SINGLE_TASK_BATCHES}" + (f" of {result.batch_size})" if result.batch_size else ")")
    return label + (f" ({result.precision})" if result.precision != "fp32" else "")


def _routed_batch(result: Result) -> int | None:
    """The evaluation batch where it changes the numbers (per-batch routing), else None."""
    return result.batch_size if result.hyperparameters.get("routing") == "per-batch" else None


def _hyperparameters(result: Result) -> str:
    """Every value; one set explicitly over the protocol is marked ``*``."""
    overridden = set(result.overrides or ())
    values = ", ".join(f"{k}={v}{'*' if k in overridden else ''}"
                       for k, v in sorted(result.hyperparameters.items())) or "-"
    if result.selection:  # tuned: say so, and which values were chosen from the grid
        grid = result.selection.get("grid", {})
        chosen = ", ".join(f"{k}={result.hyperparameters.get(k)}" for k in sorted(grid)) or "-"
        return f"tuned on validation ({result.selection.get('size')} per task): {chosen}; {values}"
    return values


def _merge_time(result: Result) -> str:
    """A merge that reused a cached training costs that training too: its full cost, marked."""
    if result.reused:
        return f"{result.training_seconds:.1f} (reused)"
    return f"{result.merge_seconds:.1f}"


def _peak_memory(result: Result) -> str:
    return f"{result.peak_rss_bytes / MB:.0f}" if result.peak_rss_bytes else "-"


@dataclasses.dataclass
class SeedMean(Result):
    """Several seeds of one configuration as one row: metrics, average and times are the
    means; the sample standard deviations and the seeds ride along for the table."""

    metrics_std: dict[str, float] = dataclasses.field(default_factory=dict)
    average_std: float = 0.0
    seeds: tuple[int, ...] = ()
    storage_std: float = 0.0  # bytes: a learned storage budget (FlexSwitch) differs from seed to seed


def _with_spread(value: float, result: Result, std: float | None) -> str:
    return f"{_percent(value)} ± {_percent(std)}" if isinstance(result, SeedMean) and std is not None else _percent(value)


def _average(result: Result) -> str:
    """The average; over several seeds, mean ± standard deviation and how many seeds."""
    if isinstance(result, SeedMean):
        return f"{_with_spread(result.average, result, result.average_std)} ({len(result.seeds)} seeds)"
    return _percent(result.average)


OVERLAP_MARK = "≈"
INTERVAL_LEGEND = (f"_{OVERLAP_MARK}: this row's 95 % interval of the average overlaps that of the row with the next "
                   "higher average in this table, so the two are not distinguishable at this test-set size._")


def _interval_bounds(result: Result) -> list[float] | None:
    return (result.interval or {}).get("average")


def _overlapping(results: list[Result]) -> set[int]:
    """The ids of the rows whose average's interval overlaps that of the next-better row: the
    rows with an interval ranked by average (rows are listed by kind and name, not by score,
    so the comparison a reader wants is with the nearest better average, not the row above)."""
    ranked = sorted((r for r in results if _interval_bounds(r)), key=lambda r: -r.average)
    return {id(worse) for better, worse in zip(ranked, ranked[1:])
            if max(_interval_bounds(better)[0], _interval_bounds(worse)[0])
            <= min(_interval_bounds(better)[1], _interval_bounds(worse)[1])}


def _interval(result: Result, overlaps: bool) -> str:
    """``average [low, high]`` in %, marked where it overlaps the next-better row; '-' where
    the record has none (written before intervals, or a task that cannot be resampled)."""
    bounds = _interval_bounds(result)
    if not bounds:
        return "-"
    text = f"{100 * result.average:.1f} [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"
    return f"{text} {OVERLAP_MARK}" if overlaps else text


def _mean_interval(group: list[Result]) -> dict[str, Any] | None:
    """The interval of a row of several seeds: the mean of the per-seed bounds (the average
    is the mean of the seeds' averages, so it stays inside), where every seed has one; else None.
    It is the typical single run's interval, not one of the mean over seeds."""
    intervals = [r.interval for r in group]
    if not all(i and i.get("average") for i in intervals):
        return None
    tasks = {task: [statistics.fmean(i["tasks"][task][k] for i in intervals) for k in (0, 1)]
             if all(i.get("tasks", {}).get(task) for i in intervals) else None
             for task in intervals[0].get("tasks", {}) if all(task in i.get("tasks", {}) for i in intervals)}
    return {**intervals[-1], "method": f"mean of the per-seed bounds of: {intervals[-1].get('method')}",
            "average": [statistics.fmean(i["average"][k] for i in intervals) for k in (0, 1)], "tasks": tasks}


def _tuning(result: Result) -> str | None:
    """A tuned record is a row of its own beside an untuned one with the same values."""
    selection = result.selection
    return json.dumps({k: selection.get(k) for k in ("on", "size", "seed", "grid")}, sort_keys=True) if selection else None


def mean_over_seeds(results: list[Result]) -> list[Result]:
    """One row per configuration: a configuration recorded with several seeds becomes a
    SeedMean (mean ± sample standard deviation); one recorded with one seed stays as it is.
    Expects one record per seed (``latest_per_configuration``)."""
    groups: dict[tuple, list[Result]] = {}
    for result in results:
        key = (result.protocol, result.method, json.dumps(result.hyperparameters, sort_keys=True),
               result.checkpoint_family, result.precision, _tuning(result), _routed_batch(result))
        groups.setdefault(key, []).append(result)
    rows: list[Result] = []
    for group in groups.values():
        if len(group) == 1:
            rows.append(group[0])
            continue
        tasks = [task for task in group[0].metrics if all(task in r.metrics for r in group)]
        values = {f.name: getattr(group[-1], f.name) for f in dataclasses.fields(Result)}
        values.update({name: statistics.fmean(getattr(r, name) for r in group)
                       for name in ("average", "merge_seconds", "training_seconds", "eval_seconds")})
        values["metrics"] = {task: statistics.fmean(r.metrics[task] for r in group) for task in tasks}
        values["interval"] = _mean_interval(group)
        storage = [r.extra_storage_bytes for r in group]
        values["extra_storage_bytes"] = round(statistics.fmean(storage))
        rows.append(SeedMean(**values, average_std=statistics.stdev(r.average for r in group),
                             metrics_std={task: statistics.stdev(r.metrics[task] for r in group) for task in tasks},
                             seeds=tuple(sorted(r.seed for r in group)), storage_std=statistics.stdev(storage)))
    return rows


def _by_checkpoints(records: list[Result]) -> list[tuple[str | None, list[Result]]]:
    """The records of one leaderboard section split by the checkpoints they were scored with
    (the prepare manifest), where they name several: methods are ranked on the same models
    only. Each set in the order first recorded, then the records naming none ("").
    ``[(None, records)]`` where they name one set at most: one section, as it is."""
    manifests = list(dict.fromkeys(r.checkpoint_manifest for r in records if r.checkpoint_manifest))
    if len(manifests) <= 1:
        return [(None, records)]
    sets = [(manifest, [r for r in records if r.checkpoint_manifest == manifest]) for manifest in manifests]
    unrecorded = [r for r in records if not r.checkpoint_manifest]
    return [*sets, *([("", unrecorded)] if unrecorded else [])]


def results_table(results: list[Result], tablefmt: str = "github", known_methods: Collection[str] | None = None) -> str:
    """One row per result: tasks, average, storage, merge and evaluation time, peak memory.
    With ``known_methods``, a record of any other method is marked and listed last, so it
    is never read as one of the registered methods."""
    unknown = (lambda r: r.method not in known_methods) if known_methods is not None else (lambda r: False)

    def order(r: Result) -> tuple:
        return (unknown(r), not r.reference, r.method != "pretrained", r.dynamic, r.method)

    tasks = list(OrderedDict.fromkeys(task for r in results for task in r.metrics))
    headers = ["Method", "Automatic", "Exemplars", "Extra storage (MB)", *tasks, "Avg", "Avg 95 % CI", "Merge (s)",
               "Eval (s)", "Peak memory (MB)", "Hyperparameters"]
    overlapping = _overlapping(results)
    rows = [
        [
            _method(r, unknown(r)),
            _automatic(r),
            _exemplars(r),
            _storage(r),
            *(_with_spread(r.metrics[t], r, getattr(r, "metrics_std", {}).get(t)) if t in r.metrics else ""
              for t in tasks),
            _average(r),
            _interval(r, id(r) in overlapping),
            _merge_time(r),
            f"{r.eval_seconds:.1f}",
            _peak_memory(r),
            _hyperparameters(r),
        ]
        for r in sorted(results, key=order)
    ]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def _current_defaults(method: str) -> dict[str, Any]:
    if method not in METHODS.names():
        return {}
    return {k: getattr(v, "default", v) for k, v in METHODS.get(method).hyperparameters.items()}


def _same_storage(a: int, b: int, tolerance: float = 0.01) -> bool:
    """Storage sizes of one configuration: equal up to container headers (a new container
    version moves a file by a few bytes per tensor; another storage format or sparsity
    moves it by far more than ``tolerance``)."""
    return abs(a - b) <= tolerance * max(a, b)


def latest_per_configuration(results: list[Result]) -> list[Result]:
    """The newest record for each (method, hyperparameters, seed) of a backbone.

    A record older than one of its method's hyperparameters ran with what is now that
    hyperparameter's default, so it counts (and is shown) with the default filled in;
    that inference is only trusted when the storage agrees with the record it would
    merge with (see ``_same_storage``), otherwise both are kept, each as recorded. A record
    naming a hyperparameter the method no longer declares ran a method that has changed
    since (e.g. Twin-Merging's router_steps): it is shown as recorded, nothing filled in."""
    defaults: dict[str, dict[str, Any]] = {}

    def completed(result: Result) -> dict[str, Any]:
        if result.method not in defaults:
            defaults[result.method] = _current_defaults(result.method)
        if set(result.hyperparameters) - set(defaults[result.method]):
            # it names a hyperparameter the method no longer has: the method changed since, and
            # today's defaults say nothing about how it ran
            return dict(result.hyperparameters)
        return {**defaults[result.method], **result.hyperparameters}

    def key(result: Result, hyperparameters: dict[str, Any], with_defaults: bool) -> tuple:
        # precision changes the numbers, so a bf16 run is a row of its own beside the fp32 one
        return (result.protocol, result.method, json.dumps(hyperparameters, sort_keys=True), result.seed, with_defaults,
                result.precision, _tuning(result), _routed_batch(result))

    latest: dict[tuple, Result] = {}
    for result in results:  # records are in append order, so later ones win
        full = completed(result)
        slot = key(result, full, True)
        earlier = latest.get(slot)
        if (earlier is not None and earlier.hyperparameters != result.hyperparameters
                and not _same_storage(earlier.extra_storage_bytes, result.extra_storage_bytes)):
            # matched only through defaults, and the storage says otherwise: what lacks a
            # hyperparameter stands as recorded
            if full != result.hyperparameters:
                slot = key(result, result.hyperparameters, False)
            else:
                del latest[slot]
                latest[key(earlier, earlier.hyperparameters, False)] = earlier
        latest[slot] = result
    return [dataclasses.replace(r, hyperparameters=completed(r)) if slot[4] else r for slot, r in latest.items()]


# the packages whose version is shown under each table (every record stores more)
SHOWN_VERSIONS = ("torch", "transformers", "numpy", "scikit-learn")


def versions_line(results: list[Result]) -> str:
    """The versions the rows ran with: a number can change with them, so a table that mixes
    versions says so."""
    parts = []
    for package in SHOWN_VERSIONS:
        seen = sorted({r.versions[package] for r in results if package in r.versions})
        if seen:
            parts.append(f"{package} {' / '.join(seen)}")
    return f"_Package versions of these rows: {'; '.join(parts)}._" if parts else "_Package versions not recorded._"


def devices_line(results: list[Result]) -> str:
    """Where the rows were evaluated and at which precision (a row not in fp32 also says so
    after its method)."""
    seen = sorted({f"{r.device} {r.precision}" for r in results})
    return f"_Evaluated on: {'; '.join(seen)}._"


def by_protocol(results: list[Result]) -> list[tuple[str | None, list[Result]]]:
    """The records grouped by protocol: registered protocols in their registry order, then
    names this mergebench does not register, then records that name none."""
    groups: dict[str | None, list[Result]] = {}
    for result in results:
        groups.setdefault(result.protocol, []).append(result)
    order = list(PROTOCOLS)

    def rank(name: str | None) -> tuple:
        return (name is None, name not in order, order.index(name) if name in order else 0, name or "")

    return [(name, groups[name]) for name in sorted(groups, key=rank)]


def protocol_heading(name: str | None) -> list[str]:
    """A sub-table's heading naming its protocol, and one line saying what that protocol is."""
    if name is None:
        return [f"### {NO_PROTOCOL}", "", "_Records written before runs named their protocol: their values are the "
                "Hyperparameters column, not a named published setting._"]
    if name not in PROTOCOLS:
        return [f"### Protocol: {name} (unknown protocol)", "", "_A protocol this mergebench does not register._"]
    return [f"### Protocol: {name}", "", f"_{PROTOCOLS[name].description}._"]


def leaderboard_markdown(results_dir: Path, figure_dir: Path | None = None) -> str:
    """The leaderboard of every record under ``results_dir``. A malformed or contradictory
    record is refused (RecordError naming file:line, field and reason); records of a method
    or backbone that is not registered are shown, marked, after the registered ones. With
    ``figure_dir``, each backbone's figure (``mergebench.figure``, drawn from its rows as a
    DataFrame) is written there and embedded under its heading by file name."""
    located = list(iter_records(Path(results_dir)))
    lines = [
        "# mergebench leaderboard",
        "",
        "Generated by `mergebench leaderboard` from the records in `results/` alone; "
        "do not edit by hand. Metrics in %; extra storage is the size on disk of what a "
        "method keeps beyond the pretrained weights ('-': nothing; over several seeds, their mean ± standard "
        "deviation where it differs). Automatic: a dynamic "
        "method that needs no task identity at inference. Exemplars: unlabelled examples "
        "per task the method used. Merge (s): the time to build the merge, training included; "
        "'(reused)': the method reused a cached training, and the time is that training's "
        "original cost plus merging. Eval (s): evaluating every task. Peak memory: peak "
        "resident memory of the run. '(unknown method)', '(unknown backbone)': records of a "
        "method or backbone this mergebench does not register, listed after the registered ones. "
        "Rows are grouped by protocol (the named setting of hyperparameters and evaluation they ran "
        "under, `mergebench list --protocol NAME`); rows of different protocols are not comparable and "
        "are never ranked together. A hyperparameter marked * was set explicitly over the protocol. "
        f"'({SINGLE_TASK_BATCHES} of N)': routing averaged over an evaluation batch of N inputs of one task, as the T-Switch "
        "authors' code evaluates Auto-Switch; not automatic in deployment. Results scored on different "
        "pinned data (the manifest of a suite's shipped splits), or on different checkpoints of one backbone "
        "(the prepare manifest: a suite fine-tuned locally can round differently on another machine), are in "
        "sections of their own. "
        "Avg 95 % CI: the average and its 95 % confidence interval, a percentile bootstrap over each task's test "
        "examples (1,000 resamples, seeded, as recorded); a row of several seeds shows the mean of its seeds' "
        f"bounds; '-': not recorded. {OVERLAP_MARK} marks a row whose interval overlaps that of the row with the "
        "next higher average in its table: at this test-set size the two are not distinguishable.",
    ]
    by_backbone: dict[tuple[str, str, str], list[Result]] = {}
    first_of_backbone: dict[str, tuple[str, Result]] = {}
    for where, result in located:  # results of different checkpoint families are never mixed
        first_where, first = first_of_backbone.setdefault(result.backbone, (where, result))
        if result.suite != first.suite:
            raise RecordError(f"{where}: suite: {result.suite!r} contradicts {first_where}, which records suite "
                              f"{first.suite!r} for backbone {result.backbone!r}")
        # nor are results scored on different pinned data (the mini suite's versions)
        by_backbone.setdefault((result.backbone, result.checkpoint_family or "", result.data_manifest or ""),
                               []).append(result)
    known_backbones, known_methods = set(BACKBONES.names()), set(METHODS.names())
    pinned = {(backbone, family) for backbone, family, data in by_backbone if data}
    registered_first = sorted(by_backbone.items(),
                              key=lambda item: (item[0][0] not in known_backbones, item[0][:2], not item[0][2], item[0]))
    sections = [(key, manifest, subset) for key, records in registered_first
                for manifest, subset in _by_checkpoints(records)]
    for (backbone, family, data), manifest, records in sections:
        latest = mean_over_seeds(latest_per_configuration(records))
        checkpoint_parts = [family] if family else []
        if manifest is not None:
            checkpoint_parts.append(f"manifest {manifest[:12]}" if manifest else "manifest not recorded")
        checkpoints = f", checkpoints: {', '.join(checkpoint_parts)}" if checkpoint_parts else ""
        unknown = " (unknown backbone)" if backbone not in known_backbones else ""
        if data:
            data_label = f", data: manifest {data[:12]}"
        elif (backbone, family) in pinned:
            data_label = ", data: not pinned (recorded before runs named the data manifest)"
        else:
            data_label = ""
        lines += ["", f"## {backbone}{unknown} (suite: {latest[0].suite}{checkpoints}{data_label})"]
        if figure_dir is not None:
            from mergebench.figure import figure_name, write_figure  # lazily: matplotlib

            shown = to_frame([row for _, rows in by_protocol(latest) for row in rows])
            set_name = None if manifest is None else f"checkpoints-{manifest[:12] or 'unrecorded'}"
            name = figure_name(backbone, "-".join(part for part in (family, data[:12], set_name) if part))
            write_figure(shown, Path(figure_dir) / name,
                         f"{backbone}{unknown} (suite: {latest[0].suite}{checkpoints}{', data ' + data[:12] if data else ''})")
            lines += ["", f"![{backbone}: average metric against extra storage]({name})"]
        for protocol, rows in by_protocol(latest):
            table = results_table(rows, known_methods=known_methods)
            lines += ["", *protocol_heading(protocol), "", table, *(["", INTERVAL_LEGEND] if OVERLAP_MARK in table else [])]
        lines += ["", versions_line(latest), "", devices_line(latest)]
    if not by_backbone:
        lines += ["", "_No results yet: run `mergebench run --method METHOD --backbone BACKBONE`._"]
    return "\n".join(lines) + "\n"
