"""B-Approx (Auto-FlexSwitch, arXiv 2604.28109, Sec. III-B2 / Fig. 2; T-Switch,
CVPR 2025, Sec. 3.3 / Fig. 4 left): each task with its own task vector, P-Spar alone
against P-Spar followed by binarisation, beta * A (.) P (Eq. 3), per pruning rate.
"""
from __future__ import annotations

import numpy as np

from mergebench.analysis.edits import Edit
from mergebench.analysis.options import PAPER_ALPHAS, AnalysisOptions
from mergebench.analysis.probe import Prober
from mergebench.analysis.report import Report, finish_panels, markdown_table, points


def run(backbone, options: AnalysisOptions) -> list:
    alphas = tuple(options.alphas or PAPER_ALPHAS)
    prober = Prober(backbone, options.examples, options.batch_size, use_cache=options.use_cache,
                    device=options.device)
    tasks = prober.tasks
    spar = {a: Edit("keep-high", a) for a in alphas}
    binary = {a: Edit("binary", a) for a in alphas}
    results = prober.run([Edit("full"), *spar.values(), *binary.values()], desc="b-approx")
    individual = results["full"]

    def avg(metrics):
        return float(np.mean([metrics[t] for t in tasks]))

    rows = [["Individual (alpha = 0)", "-", *(points(individual[t]) for t in tasks), points(avg(individual))]]
    for a in alphas:
        s, b = results[spar[a].spec()], results[binary[a].spec()]
        rows.append(["P-Spar", f"{a:g}", *(points(s[t]) for t in tasks), points(avg(s))])
        rows.append(["P-Spar + B-Approx", f"{a:g}", *(points(b[t]) for t in tasks), points(avg(b))])
    gaps = {a: {t: results[spar[a].spec()][t] - results[binary[a].spec()][t] for t in tasks} for a in alphas}
    gap_rows = [[f"{a:g}", *(points(gaps[a][t]) for t in tasks), points(float(np.mean(list(gaps[a].values()))))]
                for a in alphas]
    above = [(t, a) for a in alphas for t in tasks if results[binary[a].spec()][t] > individual[t]]
    worst = max(((t, a) for a in alphas for t in tasks), key=lambda ta: gaps[ta[1]][ta[0]])
    examples = options.evaluated_on

    report = Report("b-approx", f"B-Approx on {backbone.name} ({backbone.suite} suite)", options.command)
    report.intro = (
        f"Each task runs its own task vector after P-Spar at pruning rate alpha (C1 of the pulse analysis), alone or "
        f"binarised as beta * A (.) P with one knob beta = ||tau (.) A||_2 / ||A (.) P||_2 per tensor (Eq. 3, built with "
        f"the T-Switch codec). Accuracy (%) on {examples} of each task."
    )
    report.add("Accuracy per task", markdown_table(["task vector", "alpha", *tasks, "avg"], rows))
    report.add("Gap P-Spar minus B-Approx (points; negative: binarising helps)",
               markdown_table(["alpha", *tasks, "avg"], gap_rows))
    report.add("Findings", (
        f"Largest loss from binarising: {points(gaps[worst[1]][worst[0]])} points on {worst[0]} at alpha = {worst[1]:g}. "
        f"B-Approx beats the Individual model in {len(above)} of {len(alphas) * len(tasks)} (task, alpha) cells"
        + (f" ({', '.join(f'{t} @ {a:g}' for t, a in above[:8])}{', ...' if len(above) > 8 else ''})." if above else ".")))
    report.raw = {"backbone": backbone.name, "examples": options.examples, "alphas": list(alphas),
                  "individual": individual, "p_spar": {f"{a:g}": results[spar[a].spec()] for a in alphas},
                  "b_approx": {f"{a:g}": results[binary[a].spec()] for a in alphas}}

    def draw(plt):
        panels = [*tasks, "average"]
        cols = 4
        nrows = -(-len(panels) // cols)
        figure, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        x = np.arange(len(alphas))
        for ax, panel in zip(axes.flat, panels):
            def value(metrics):
                return 100 * (avg(metrics) if panel == "average" else metrics[panel])

            ax.bar(x - 0.2, [value(results[spar[a].spec()]) for a in alphas], 0.4, color="tab:blue", label="P-Spar")
            ax.bar(x + 0.2, [value(results[binary[a].spec()]) for a in alphas], 0.4, color="tab:red", label="P-Spar + B-Approx")
            ax.axhline(value(individual), ls="--", color="purple", lw=1, label="Individual")
            low = min(value(results[e.spec()]) for e in [*spar.values(), *binary.values()])
            ax.set_ylim(max(0.0, low - 5), min(100.0, max(value(individual), low) + 5))
            ax.set_xticks(x, [f"{a:g}" for a in alphas], fontsize=7)
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel("pruning rate alpha")
            ax.set_ylabel("accuracy (%)")
        return finish_panels(figure, axes, len(panels), f"B-Approx: {backbone.name}, {examples} per task")

    return report.write(options.output_dir, draw if options.plot else None)
