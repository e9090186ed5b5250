"""The pulse-activation analysis (T-Switch, CVPR 2025, Sec. 3.2 / Fig. 3;
Auto-FlexSwitch, arXiv 2604.28109, Sec. III-B1 / Fig. 1): each task with its own
task vector, accuracy against the pruning rate alpha for three controls that each
prune a fraction alpha: C1 the smallest magnitudes (P-Spar), C2 the largest, C3 at
random (mean of ``seeds`` trials). The pulse-like pattern is C1 > C3 > C2.
"""
from __future__ import annotations

import numpy as np

from mergebench.analysis.edits import Edit
from mergebench.analysis.options import PAPER_ALPHAS, AnalysisOptions
from mergebench.analysis.probe import Prober
from mergebench.analysis.report import Report, finish_panels, markdown_table, points

CONTROLS = {"C1": "prune the smallest (P-Spar)", "C2": "prune the largest", "C3": "prune at random"}


def edits_for(alphas, seeds: int, rescale: bool) -> dict[str, dict[float, list[Edit]]]:
    """{control: {alpha: [edits]}}; C3 has one edit per seed, the others one."""
    return {
        "C1": {a: [Edit("keep-high", a)] for a in alphas},
        "C2": {a: [Edit("keep-low", a)] for a in alphas},
        "C3": {a: [Edit("random", a, seed=s, rescale=rescale) for s in range(seeds)] for a in alphas},
    }


def summarise(results: dict[str, dict[str, float]], grid, tasks) -> dict[str, dict[float, dict[str, list[float]]]]:
    """{control: {alpha: {task: [metric per trial]}}}."""
    return {control: {a: {t: [results[e.spec()][t] for e in edits] for t in tasks} for a, edits in by_alpha.items()}
            for control, by_alpha in grid.items()}


def ordering(summary, alphas, tasks) -> dict[str, int]:
    """How many (task, alpha) cells have C1 >= C3 >= C2, and how many the strict C1 > C3 > C2."""
    weak = strict = 0
    for a in alphas:
        for t in tasks:
            c1, c2, c3 = (float(np.mean(summary[c][a][t])) for c in ("C1", "C2", "C3"))
            weak += c1 >= c3 >= c2
            strict += c1 > c3 > c2
    return {"weak": weak, "strict": strict, "cells": len(alphas) * len(tasks)}


def run(backbone, options: AnalysisOptions) -> list:
    alphas = tuple(options.alphas or PAPER_ALPHAS)
    prober = Prober(backbone, options.examples, options.batch_size, use_cache=options.use_cache,
                    device=options.device)
    tasks = prober.tasks
    grid = edits_for(alphas, options.seeds, options.rescale_random)
    references = [Edit("full"), Edit("pretrained")]
    all_edits = references + [e for by_alpha in grid.values() for edits in by_alpha.values() for e in edits]
    results = prober.run(all_edits, desc="pulse")
    individual, pretrained = results["full"], results["pretrained"]
    summary = summarise(results, grid, tasks)

    def mean(control, a, t):
        return float(np.mean(summary[control][a][t]))

    def average(control, a):
        return float(np.mean([mean(control, a, t) for t in tasks]))

    rows = [["Individual (alpha = 0)", "-", *(points(individual[t]) for t in tasks), points(np.mean(list(individual.values())))],
            ["Pretrained", "-", *(points(pretrained[t]) for t in tasks), points(np.mean(list(pretrained.values())))]]
    for control in CONTROLS:
        for a in alphas:
            rows.append([control, f"{a:g}", *(points(mean(control, a, t)) for t in tasks), points(average(control, a))])
    counts = ordering(summary, alphas, tasks)
    averages = {c: [average(c, a) for a in alphas] for c in CONTROLS}
    examples = options.evaluated_on

    report = Report("pulse", f"Pulse activation on {backbone.name} ({backbone.suite} suite)", options.command)
    report.intro = (
        f"Each task runs its own task vector (task identity known), edited per tensor at pruning rate alpha: **C1** "
        f"prunes the alpha fraction of smallest magnitudes of each sign (P-Spar), **C2** the alpha fraction of largest "
        f"ones (the low magnitudes survive), **C3** a random alpha fraction "
        f"({'survivors rescaled by 1/(1 - alpha), as DARE' if options.rescale_random else 'not rescaled, as Auto-FlexSwitch'}"
        f"; mean of {options.seeds} seeds); a fraction 1 - alpha survives in all three. Accuracy (%) on {examples} of "
        f"each task."
    )
    report.add("Accuracy per task", markdown_table(["control", "alpha", *tasks, "avg"], rows))
    report.add("Average over tasks", markdown_table(
        ["alpha", *(f"{c} avg" for c in CONTROLS), "C1 - C3", "C3 - C2"],
        [[f"{a:g}", *(points(averages[c][i]) for c in CONTROLS), points(averages["C1"][i] - averages["C3"][i]),
          points(averages["C3"][i] - averages["C2"][i])] for i, a in enumerate(alphas)]))
    report.add("Ordering", (
        f"C1 >= C3 >= C2 holds in {counts['weak']} of {counts['cells']} (task, alpha) cells, strictly (C1 > C3 > C2) in "
        f"{counts['strict']}. On the task average it holds at alpha = "
        f"{', '.join(f'{a:g}' for i, a in enumerate(alphas) if averages['C1'][i] >= averages['C3'][i] >= averages['C2'][i]) or 'none'}."))
    report.raw = {"backbone": backbone.name, "examples": options.examples, "alphas": list(alphas), "seeds": options.seeds,
                  "rescale_random": options.rescale_random, "individual": individual, "pretrained": pretrained,
                  "controls": {c: {f"{a:g}": summary[c][a] for a in alphas} for c in CONTROLS}, "ordering": counts}

    def draw(plt):
        panels = [*tasks, "average"]
        cols = 4
        rows_ = -(-len(panels) // cols)
        figure, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), squeeze=False)
        colours = {"C1": "tab:blue", "C2": "tab:red", "C3": "tab:green"}
        for ax, panel in zip(axes.flat, panels):
            for control in CONTROLS:
                if panel == "average":
                    values, spread = [100 * v for v in averages[control]], None
                else:
                    values = [100 * mean(control, a, panel) for a in alphas]
                    spread = [100 * float(np.std(summary[control][a][panel])) for a in alphas] if control == "C3" else None
                ax.errorbar(alphas, values, yerr=spread, marker="o", ms=3, capsize=2, color=colours[control],
                            label=f"{control}: {CONTROLS[control]}")
            base = np.mean(list(individual.values())) if panel == "average" else individual[panel]
            ax.axhline(100 * base, ls="--", color="k", lw=1, label="Individual")
            floor = np.mean(list(pretrained.values())) if panel == "average" else pretrained[panel]
            ax.axhline(100 * floor, ls=":", color="grey", lw=1, label="Pretrained")
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel("pruning rate alpha")
            ax.set_ylabel("accuracy (%)")
        return finish_panels(figure, axes, len(panels), f"Pulse activation: {backbone.name}, {examples} per task")

    return report.write(options.output_dir, draw if options.plot else None)
