"""Accuracy vs storage of FlexSwitch and T-Switch, both stored as SASS (Auto-FlexSwitch
Fig. 8), and the per-tensor sparsity and bit-width FlexSwitch learned, by tensor type and
layer, all read from the backbone's result records (nothing is re-run here).

The points come from runs such as::

    mergebench run --method t-switch --hp format=sass --hp alpha=0.5 --backbone minilm-l6   # alpha 0.5 ... 0.9
    mergebench run --method flexswitch --hp loss=kl --backbone minilm-l6                    # kl, mse, cka

Storage per task is the byte size of that task's stored artifact (``artifact_bytes`` in
the record's diagnostics), so the figure has one panel per task, as the paper's.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from mergebench.analysis.groups import tensor_layer, tensor_type
from mergebench.analysis.report import Report, finish_panels, markdown_table, points
from mergebench.errors import MissingResourceError
from mergebench.results import Result, load_results


def latest_records(results: list[Result], backbone: str, data_manifest: str | None = None) -> dict[str, Result]:
    """One point per Fig. 8 configuration: 'flexswitch (kl)', 't-switch a=0.5', ..., of the
    records scored on the backbone's current data (``data_manifest``; points on other data
    are not comparable): the newest record's configuration, the newest record of each of its
    seeds, several seeds as their mean (records of another configuration under the same label,
    e.g. other steps, are not seeds of it)."""
    chosen: dict[str, list[Result]] = defaultdict(list)
    current = (r for r in results if r.backbone == backbone and r.data_manifest == data_manifest)
    for result in sorted(current, key=lambda r: r.created):
        hp = result.hyperparameters
        if result.method == "flexswitch":
            coded = f", {hp['format']}" if hp.get("format", "sass") != "sass" else ""
            chosen[f"flexswitch ({hp.get('loss')}{coded})"].append(result)
        elif result.method == "t-switch" and hp.get("format") in ("sass", "ans"):
            # the same switches entropy-coded (ans): the same accuracy at a smaller size
            chosen[f"t-switch α={hp.get('alpha')}" + (" (ans)" if hp.get("format") == "ans" else "")].append(result)
    return {label: mean_of_seeds(_newest_configuration(records)) for label, records in sorted(chosen.items())}


def _newest_configuration(records: list[Result]) -> list[Result]:
    """Of records in the order written, the newest one of each seed run with the newest
    record's hyperparameters, protocol and precision."""
    def configuration(r: Result) -> tuple:
        return r.hyperparameters, r.protocol, r.precision

    newest = configuration(records[-1])
    return list({r.seed: r for r in records if configuration(r) == newest}.values())


def mean_of_seeds(records: list[Result]) -> Result:
    """A configuration run with several seeds as one point: the seeds' mean accuracies and
    sizes (a learned budget differs from seed to seed), the learned switches of the lowest
    seed (``diagnostics.seeds`` lists them all). One record stays as it is."""
    if len(records) == 1:
        return records[0]
    first = min(records, key=lambda r: r.seed)
    names = set.intersection(*(set(r.diagnostics.get("artifact_bytes", {})) for r in records))
    sizes = {name: statistics.fmean(r.diagnostics["artifact_bytes"][name] for r in records) for name in sorted(names)}
    tasks = [task for task in first.metrics if all(task in r.metrics for r in records)]
    return dataclasses.replace(
        first, metrics={task: statistics.fmean(r.metrics[task] for r in records) for task in tasks},
        average=statistics.fmean(r.average for r in records),
        extra_storage_bytes=round(statistics.fmean(r.extra_storage_bytes for r in records)),
        diagnostics={**first.diagnostics, "artifact_bytes": sizes, "seeds": sorted(r.seed for r in records)})


def task_megabytes(result: Result, task: str) -> float:
    sizes = result.diagnostics.get("artifact_bytes", {})
    return sum(size for name, size in sizes.items() if name.rsplit(".", 1)[0] == task) / 1e6


def learned_switch_summary(result: Result) -> list[list]:
    """Mean sparsity and bit-width per (tensor type, layer), over tasks, weighted by size."""
    groups: dict[tuple[str, str], list[tuple[int, float, int]]] = defaultdict(list)
    for task, record in result.diagnostics.get("flexswitch", {}).items():
        if not isinstance(record, dict) or "tensors" not in record:
            continue
        for key, tensor in record["tensors"].items():
            layer = tensor_layer(key)
            groups[(tensor_type(key), "-" if layer is None else str(layer))].append(
                (tensor["n"], tensor["sparsity"], tensor["bits"]))
    rows = []
    for (kind, layer), entries in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1].zfill(3))):
        n = np.array([e[0] for e in entries], dtype=float)
        rows.append([kind, layer, len(entries), f"{np.average([e[1] for e in entries], weights=n):.3f}",
                     f"{np.mean([e[2] for e in entries]):.2f}"])
    return rows


def run(backbone, options) -> list[Path]:
    records = latest_records(load_results(Path(options.results_dir)), backbone.name, backbone.data_manifest_hash())
    if not records:
        raise MissingResourceError(
            f"--results-dir {options.results_dir}: no flexswitch or SASS t-switch records for {backbone.name} on its "
            "current data; run e.g. `mergebench run --method t-switch --hp format=sass` and `--method flexswitch` first")
    tasks = [task.name for task in backbone.tasks]
    report = Report("pareto", f"Accuracy vs storage: FlexSwitch and T-Switch in SASS ({backbone.name})",
                    options.command, intro=__doc__.split("\n\n")[0])
    rows, raw = [], {}
    for label, result in records.items():
        sizes = [task_megabytes(result, task) for task in tasks]
        seeds = result.diagnostics.get("seeds", [result.seed])
        rows.append([label, len(seeds), points(result.average), f"{result.extra_storage_bytes / 1e6:.2f}",
                     *(f"{points(result.metrics[t])} / {mb:.2f}" for t, mb in zip(tasks, sizes))])
        raw[label] = {"average": result.average, "megabytes": result.extra_storage_bytes / 1e6, "seeds": seeds,
                      "metrics": result.metrics, "task_megabytes": dict(zip(tasks, sizes)),
                      "hyperparameters": result.hyperparameters, "created": result.created}
    report.add("Average accuracy (%) and total storage (MB), the mean over the seeds recorded; per task: "
               "accuracy % / MB", markdown_table(["configuration", "seeds", "avg", "MB", *tasks], rows))
    flex = {label: r for label, r in records.items() if label.startswith("flexswitch")}
    for label, result in flex.items():
        report.add(f"Learned sparsity and bit-width, {label}, seed {result.seed} (size-weighted over tasks)",
                   markdown_table(["tensor type", "layer", "tensors", "sparsity", "mean bits"],
                                  learned_switch_summary(result)))
    report.raw = raw

    def draw(plt):
        columns = min(3, len(tasks))
        rows_ = -(-len(tasks) // columns)
        figure, axes = plt.subplots(rows_, columns, figsize=(4.2 * columns, 3.4 * rows_), squeeze=False)
        for axis, task in zip(axes.flat, tasks):
            for coded, color, name in ((False, "tab:gray", "T-Switch, SASS"), (True, "tab:green", "T-Switch, ans")):
                switch = sorted((r for label, r in records.items()
                                 if label.startswith("t-switch") and label.endswith("(ans)") == coded),
                                key=lambda r: task_megabytes(r, task))
                if switch:
                    axis.plot([task_megabytes(r, task) for r in switch], [100 * r.metrics[task] for r in switch],
                              "o-", color=color, label=name)
            for marker, (label, result) in zip("s^Dv", flex.items()):
                axis.plot(task_megabytes(result, task), 100 * result.metrics[task], marker, markersize=8, label=label)
            axis.set_title(task)
            axis.set_xlabel("storage (MB)")
            axis.set_ylabel("accuracy (%)")
            axis.grid(alpha=0.3)
        return finish_panels(figure, axes, len(tasks))

    return report.write(options.output_dir, draw if options.plot else None)
