"""The settings shared by every analysis (``mergebench analyze`` options)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAPER_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # Auto-FlexSwitch Figs. 1-2


@dataclass
class AnalysisOptions:
    output_dir: Path = Path("analyses")
    examples: int | None = None  # first N test examples per task (None: the whole test split)
    alphas: tuple[float, ...] | None = None  # None: each analysis's own default grid
    seeds: int = 3  # C3 repetitions (the paper averages three)
    etas: tuple[float, ...] | None = None  # Exp III tuning factors
    bits: tuple[int, ...] = (1,)  # SASS value bit-widths
    rescale_random: bool = False  # C3 rescales the survivors by 1 / (1 - alpha) (the CVPR paper's DARE control)
    batch_size: int = 64
    use_cache: bool = True
    plot: bool = True
    command: str = "mergebench analyze"
    results_dir: Path = Path("results")  # pareto: where the result records are
    device: str = "cpu"  # where evaluations run (``--device``, resolved: "cpu", "cuda:0", "mps")

    @property
    def evaluated_on(self) -> str:
        """What each task is evaluated on, as the reports say it."""
        return f"the first {self.examples} test examples" if self.examples else "the whole test split"
