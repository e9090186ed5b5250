"""The papers' analyses of task vectors, run on a backbone's real checkpoints
(``mergebench analyze <name>``); each writes a markdown table, the raw numbers as
JSON and a PNG figure into an output directory (default ``analyses/``).

* ``pulse``: accuracy vs pruning rate for C1 / C2 / C3 (T-Switch Sec. 3.2,
  Auto-FlexSwitch Fig. 1);
* ``b-approx``: P-Spar alone vs P-Spar + binarisation (Auto-FlexSwitch Fig. 2);
* ``sensitivity``: Exp I-III, per module type and layer, and the eta sweep (Figs. 4-5);
* ``sass``: SASS file size vs Eq. 16 on the real task vectors (Figs. 7 and 12);
* ``pareto``: accuracy vs storage of FlexSwitch and T-Switch in SASS (Fig. 8) and the
  learned sparsity / bit-width by tensor type and layer, from the records in ``results/``.
"""
from __future__ import annotations

import importlib

from mergebench.analysis.options import AnalysisOptions

ANALYSES = {"pulse": "pulse", "b-approx": "bapprox", "sensitivity": "sensitivity", "sass": "sass", "pareto": "pareto"}


def run_analysis(name: str, backbone, options: AnalysisOptions) -> list:
    """Run one analysis; returns the paths it wrote."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; valid: {', '.join(ANALYSES)}")
    if options.plot:
        from mergebench.analysis.report import pyplot

        pyplot()  # fail before any evaluation when matplotlib is missing
    module = importlib.import_module(f"mergebench.analysis.{ANALYSES[name]}")
    return module.run(backbone, options)


__all__ = ["ANALYSES", "AnalysisOptions", "run_analysis"]
