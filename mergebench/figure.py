"""The leaderboard's picture: per backbone, average metric against extra storage, one panel
per protocol (rows of different protocols are never compared), drawn from the leaderboard's
rows as a DataFrame (``mergebench.results.to_frame``).

Storage is on a log scale, so a method that keeps nothing beyond the pretrained weights sits
on a "0" tick a decade left of the smallest stored size. Each method has one marker (its
configurations share it); the Pareto front (no other row both smaller and better) is the
step line; rows averaged over seeds carry their sample standard deviation as error bars.
The PNG has a fixed size and resolution and no timestamp or software tag, so drawing the
same records again gives the same bytes (with the same matplotlib)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from mergebench.analysis.report import PlotsUnavailableError, pyplot
from mergebench.cache import write_atomically

MB = 1_000_000
PANEL_INCHES = (6.4, 4.8)  # one protocol's panel
LEGEND_INCHES = 1.9  # the legend column on the right
DPI = 100
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "p", "h", "d", "8", "H")


def plots_unavailable() -> str | None:
    """Why the figure cannot be drawn here (matplotlib missing), or None when it can."""
    try:
        pyplot()
    except PlotsUnavailableError:
        return "matplotlib is not installed (pip install 'mergebench[plots]')"
    return None


def figure_name(backbone: str, family: str | None = None) -> str:
    """``leaderboard-<backbone>[-<checkpoint family>].png``, with only file-safe characters."""
    stem = backbone + (f"-{family}" if family else "")
    return f"leaderboard-{re.sub(r'[^A-Za-z0-9._-]+', '-', stem)}.png"


def pareto_front(storage: np.ndarray, score: np.ndarray) -> np.ndarray:
    """A boolean mask of the rows no other row dominates (storage no larger and score no
    smaller, one of them strictly); of identical rows the first is kept."""
    storage, score = np.asarray(storage, dtype=float), np.asarray(score, dtype=float)
    order = np.lexsort((np.arange(len(score)), -score, storage))  # by storage, best score first
    best_before = np.concatenate(([-np.inf], np.maximum.accumulate(score[order])[:-1]))
    mask = np.zeros(len(score), dtype=bool)
    mask[order] = score[order] > best_before
    return mask


def zero_position(megabytes: np.ndarray) -> float:
    """Where zero storage is drawn on the log axis: a decade below the smallest stored size."""
    positive = megabytes[megabytes > 0]
    return 10.0 ** (math.floor(math.log10(positive.min())) - 1) if positive.size else 0.1


def draw(frame, title: str):
    """The figure of one backbone's leaderboard rows (a DataFrame with method, protocol,
    average, extra_storage_bytes and, for rows of several seeds, average_std)."""
    plt = pyplot()
    protocols = list(dict.fromkeys(frame["protocol"].fillna("(no protocol recorded)")))
    methods = sorted(set(frame["method"]))
    style = {method: (MARKERS[i % len(MARKERS)], plt.get_cmap("tab20")(i % 20)) for i, method in enumerate(methods)}
    width = PANEL_INCHES[0] * len(protocols) + LEGEND_INCHES
    figure, axes = plt.subplots(1, len(protocols), figsize=(width, PANEL_INCHES[1]), dpi=DPI, squeeze=False)
    all_mb = frame["extra_storage_bytes"].to_numpy(dtype=float) / MB
    zero_x = zero_position(all_mb)
    for axis, protocol in zip(axes.flat, protocols):
        rows = frame[frame["protocol"].fillna("(no protocol recorded)") == protocol]
        megabytes = rows["extra_storage_bytes"].to_numpy(dtype=float) / MB
        x = np.where(megabytes > 0, megabytes, zero_x)
        y = 100 * rows["average"].to_numpy(dtype=float)
        std = 100 * (rows["average_std"].to_numpy(dtype=float) if "average_std" in rows else np.full(len(rows), np.nan))
        front = pareto_front(megabytes, y)
        order = np.argsort(x[front], kind="stable")
        axis.step(x[front][order], y[front][order], where="post", color="0.6", linewidth=1, zorder=1,
                  label="Pareto front")
        for method in methods:
            mine = (rows["method"] == method).to_numpy()
            if not mine.any():
                continue
            marker, colour = style[method]
            axis.scatter(x[mine], y[mine], marker=marker, color=colour, edgecolors="black", linewidths=0.4,
                         s=46, zorder=3, label=method)
            spread = mine & np.isfinite(std)
            if spread.any():
                axis.errorbar(x[spread], y[spread], yerr=std[spread], fmt="none", ecolor=colour, capsize=3, zorder=2)
        axis.set_xscale("log")
        axis.set_xlim(zero_x / 2, max(all_mb.max(), zero_x) * 2)
        ticks = [t for t in axis.get_xticks() if zero_x < t <= max(all_mb.max(), zero_x) * 2]
        axis.set_xticks([zero_x, *ticks], ["0", *(f"{t:g}" for t in ticks)])
        axis.minorticks_off()
        axis.set_xlabel("extra storage (MB, log scale)")
        axis.set_ylabel("average metric (%)")
        axis.set_title(f"protocol: {protocol}", fontsize=10)
        axis.grid(True, which="major", linewidth=0.3)
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="center left", fontsize=7, frameon=False,
                  bbox_to_anchor=(1 - (LEGEND_INCHES - 0.1) / width, 0.5))
    figure.suptitle(title, fontsize=11)
    figure.subplots_adjust(left=0.9 / width, right=1 - LEGEND_INCHES / width, bottom=0.12, top=0.86, wspace=0.25)
    return figure


def write_figure(frame, path: Path, title: str) -> Path:
    """Draw ``frame`` and write it to ``path`` as a PNG that is the same bytes for the same rows."""
    plt = pyplot()
    figure = draw(frame, title)
    try:
        write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=DPI,
                                                                metadata={"Software": None}))
    finally:
        plt.close(figure)
    return Path(path)
