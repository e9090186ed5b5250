"""Sensitivity probes (Auto-FlexSwitch, arXiv 2604.28109, Sec. III-C, Exp I-III,
Figs. 4-5). Each task runs its own task vector; the drop is the Individual model's
metric minus the probed one (in decimal, as the paper's heatmaps; negative: better).

* Exp I: P-Spar at alpha = 0.9 on one group of tensors (a module type across all
  layers, or one whole layer) at a time, every other tensor full.
* Exp II: B-Approx with alpha = 0 (binarise, no pruning) on one group at a time.
* Exp III: B-Approx with alpha = 0 on every tensor, each knob scaled by eta
  (beta <- eta beta); the paper sweeps eta in {0.1, ..., 2.0}.
"""
from __future__ import annotations

import numpy as np
import torch

from mergebench.analysis.edits import Edit
from mergebench.analysis.groups import groups_of
from mergebench.analysis.options import AnalysisOptions
from mergebench.analysis.probe import Prober
from mergebench.analysis.report import Report, markdown_table
from mergebench.pool import ModelPool

SPARSIFY_ALPHA = 0.9  # Exp I
PAPER_ETAS = tuple(round(0.1 * i, 1) for i in range(1, 21))


def _mean(values) -> float:
    return round(float(np.mean(values)), 10) + 0.0


def edited_keys(backbone, tasks: list[str]) -> list[str]:
    """The merged tensors that some task vector changes (the only ones an edit can touch)."""
    with ModelPool(backbone, tasks) as pool:
        return [key for key in pool.merged_keys if any(torch.any(tau) for tau in pool.task_vectors(key))]


def run(backbone, options: AnalysisOptions) -> list:
    prober = Prober(backbone, options.examples, options.batch_size, use_cache=options.use_cache,
                    device=options.device)
    tasks = prober.tasks
    etas = tuple(options.etas or PAPER_ETAS)
    alpha = options.alphas[0] if options.alphas else SPARSIFY_ALPHA
    groups = groups_of(edited_keys(backbone, tasks))
    sparsify = {g: Edit("keep-high", alpha, group=g) for g in groups}
    binarise = {g: Edit("binary", 0.0, group=g) for g in groups}
    scaled = {eta: Edit("binary", 0.0, eta=eta) for eta in etas}
    results = prober.run([Edit("full"), *sparsify.values(), *binarise.values(), *scaled.values()], desc="sensitivity")
    individual = results["full"]

    def drops(edit):  # rounded so that 1 - 1 prints as 0, not as -0.0000 from float noise
        return [round(individual[t] - results[edit.spec()][t], 10) + 0.0 for t in tasks]

    def table(edits: dict, kind: str):
        chosen = {g: e for g, e in edits.items() if g.startswith(kind)}
        rows = [[g.partition(":")[2], *(f"{d:+.4f}" for d in drops(e)), f"{_mean(drops(e)):+.4f}"] for g, e in chosen.items()]
        return markdown_table([kind, *tasks, "avg"], rows)

    eta_drops = {eta: drops(e) for eta, e in scaled.items()}
    best = {t: min(etas, key=lambda eta: eta_drops[eta][i]) for i, t in enumerate(tasks)}
    eta_rows = [[f"{eta:g}", *(f"{d:+.4f}{' *' if best[t] == eta else ''}" for t, d in zip(tasks, eta_drops[eta])),
                 f"{_mean(eta_drops[eta]):+.4f}"] for eta in etas]
    examples = options.evaluated_on

    def ranking(edits, kind):
        chosen = [(g.partition(":")[2], _mean(drops(e))) for g, e in edits.items() if g.startswith(kind)]
        return ", ".join(f"{name} ({d:+.4f})" for name, d in sorted(chosen, key=lambda x: -x[1]))

    report = Report("sensitivity", f"Sensitivity probes on {backbone.name} ({backbone.suite} suite)", options.command)
    report.intro = (
        f"Drop = Individual metric minus the probed one, in decimal (0.01 = one point; negative = better than "
        f"Individual), on {examples} of each task. Groups: module types across all layers (`bias` = the biases of all "
        f"linear layers, `layernorm` = LayerNorm weights and biases) and whole layers; only tensors some task vector "
        f"changes are probed."
    )
    report.add(f"Exp I: P-Spar (alpha = {alpha:g}) on one module type", table(sparsify, "type"))
    report.add(f"Exp I: P-Spar (alpha = {alpha:g}) on one layer", table(sparsify, "layer"))
    report.add("Exp II: binarisation (B-Approx, alpha = 0) on one module type", table(binarise, "type"))
    report.add("Exp II: binarisation (B-Approx, alpha = 0) on one layer", table(binarise, "layer"))
    report.add("Exp III: B-Approx (alpha = 0) everywhere, knobs scaled by eta (* = best eta of the task)",
               markdown_table(["eta", *tasks, "avg"], eta_rows))
    report.add("Findings", "\n".join([
        f"- Exp I, module types by mean drop: {ranking(sparsify, 'type')}.",
        f"- Exp I, layers by mean drop: {ranking(sparsify, 'layer')}.",
        f"- Exp II, module types by mean drop: {ranking(binarise, 'type')}.",
        f"- Exp II, layers by mean drop: {ranking(binarise, 'layer')}.",
        f"- Exp III, best eta per task: {', '.join(f'{t} {best[t]:g}' for t in tasks)}; "
        f"eta = 1 is best for {sum(best[t] == 1.0 for t in tasks)} of {len(tasks)} tasks.",
    ]))
    report.raw = {"backbone": backbone.name, "examples": options.examples, "alpha": alpha, "etas": list(etas),
                  "individual": individual, "exp1": {g: results[e.spec()] for g, e in sparsify.items()},
                  "exp2": {g: results[e.spec()] for g, e in binarise.items()},
                  "exp3": {f"{eta:g}": results[e.spec()] for eta, e in scaled.items()}}

    def draw(plt):
        figure = plt.figure(figsize=(18, 10), layout="constrained")
        grid = figure.add_gridspec(2, 4, height_ratios=[1.3, 1])
        heatmaps = []
        panels = [(sparsify, "type", f"Exp I: P-Spar {alpha:g}, module type"), (sparsify, "layer", "Exp I: layer"),
                  (binarise, "type", "Exp II: binarise, module type"), (binarise, "layer", "Exp II: layer")]
        matrices = [np.array([drops(e) for g, e in edits.items() if g.startswith(kind)]) for edits, kind, _ in panels]
        limit = max(float(np.abs(m).max()) for m in matrices) or 1.0
        for column, ((edits, kind, title), matrix) in enumerate(zip(panels, matrices)):
            ax = figure.add_subplot(grid[0, column])
            heatmaps.append(ax)
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
            labels = [g.partition(":")[2] for g in edits if g.startswith(kind)]
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(title, fontsize=10)
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        figure.colorbar(image, ax=heatmaps, shrink=0.8, label="drop vs Individual (decimal)")
        ax = figure.add_subplot(grid[1, :])
        for i, t in enumerate(tasks):
            line = ax.plot(etas, [eta_drops[eta][i] for eta in etas], marker="o", ms=3, label=t)[0]
            ax.plot([best[t]], [eta_drops[best[t]][i]], marker="*", ms=12, color=line.get_color())
        ax.axvline(1.0, ls="--", color="k", lw=2)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("tuning factor eta (beta <- eta beta)")
        ax.set_ylabel("drop vs Individual (decimal)")
        ax.set_title("Exp III: B-Approx (alpha = 0) on every tensor, knobs scaled by eta", fontsize=10)
        ax.legend(fontsize=7, ncol=3)
        figure.suptitle(f"Sensitivity probes: {backbone.name}, {examples} per task")
        return figure

    return report.write(options.output_dir, draw if options.plot else None)
