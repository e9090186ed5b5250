"""Where an analysis writes: ``<name>.md`` (the command, the tables, the notes),
``<name>.json`` (every measured number) and ``<name>.png`` (the figure, drawn with
matplotlib from the optional extra ``plots``), all written atomically."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tabulate import tabulate

from mergebench.cache import write_atomically, write_json


class PlotsUnavailableError(RuntimeError):
    """matplotlib is missing."""


def pyplot():
    """matplotlib.pyplot with a file-only backend; a clear error naming the extra when missing."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailableError(
            "drawing the figure needs matplotlib: pip install 'mergebench[plots]' (or pass --no-plot)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_panels(figure, axes, used: int, title: str | None = None):
    """Blank the unused panels of a grid, put the legend on the first, title and lay out the figure."""
    for axis in list(axes.flat)[used:]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return tabulate(rows, headers=list(headers), tablefmt="github", disable_numparse=True)


def points(value: float) -> str:
    """A metric in [0, 1] as percentage points with two decimals."""
    return f"{100 * value:.2f}"


@dataclass
class Report:
    name: str
    title: str
    command: str
    intro: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, markdown body)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def markdown(self) -> str:
        parts = [f"# {self.title}", "", f"`{self.command}`", ""]
        if self.intro:
            parts += [self.intro.strip(), ""]
        parts.append(f"![{self.name}]({self.name}.png)")
        parts.append("")
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body.strip(), ""]
        return "\n".join(parts)

    def write(self, output_dir: Path, draw: Callable[[Any], Any] | None) -> list[Path]:
        """Write the markdown, the raw JSON and (if ``draw`` is given) the figure
        ``draw(pyplot) -> Figure``; returns the paths written."""
        output_dir = Path(output_dir)
        written = []
        if draw is not None:
            plt = pyplot()
            figure = draw(plt)
            png = output_dir / f"{self.name}.png"
            write_atomically(png, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
            plt.close(figure)
            written.append(png)
        text = self.markdown() if draw is not None else self.markdown().replace(f"![{self.name}]({self.name}.png)\n", "")
        written.append(write_atomically(output_dir / f"{self.name}.md", lambda tmp: tmp.write_text(text)))
        written.append(write_json(output_dir / f"{self.name}.json", json.loads(json.dumps(self.raw))))
        return written
