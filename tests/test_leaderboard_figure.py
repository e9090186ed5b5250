"""The leaderboard's figure (mergebench.figure): written beside leaderboard.md and embedded,
the same bytes on a rerun, a panel per protocol, the Pareto front and seed spreads drawn,
and the table alone, said so, where matplotlib is missing."""
from __future__ import annotations

import statistics
import struct
import sys

import numpy as np
import pytest

from mergebench.cli import main
from mergebench.figure import draw, figure_name, pareto_front, zero_position
from mergebench.results import append_result, to_frame
from mergebench.table import latest_per_configuration, leaderboard_markdown, mean_over_seeds
from tests.test_results import make_result


def write_records(folder):
    records = [
        make_result(method="pretrained", average=0.4, reference=True, hyperparameters={}, protocol="original"),
        make_result(seed=0, average=0.5, protocol="original"),
        make_result(seed=1, average=0.62, protocol="original"),
        make_result(seed=2, average=0.56, protocol="original"),
        make_result(method="t-switch", average=0.7, storage=3_000_000, dynamic=True, automatic=False,
                    hyperparameters={"alpha": 0.5}, protocol="original"),
        make_result(method="emr-merging", average=0.65, storage=40_000_000, dynamic=True, automatic=False,
                    hyperparameters={}, protocol="original"),
        make_result(method="t-switch", average=0.72, storage=3_500_000, dynamic=True, automatic=False,
                    hyperparameters={"alpha": 0.5}, protocol="t-switch-cvpr2025"),
    ]
    for record in records:
        append_result(folder, record)
    return records


def png_chunks(data: bytes) -> list[bytes]:
    """The chunk types of a PNG file, read from its bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        chunks.append(data[offset + 4:offset + 8])
        offset += 12 + length
    return chunks


def test_pareto_front_matches_a_pairwise_dominance_check():
    rng = np.random.default_rng(0)
    storage = rng.choice([0.0, 1.0, 2.0, 5.0, 9.0], size=40)
    score = rng.choice([0.5, 0.6, 0.7, 0.8], size=40)
    front = pareto_front(storage, score)
    for i in range(40):
        dominated = any((storage[j] <= storage[i] and score[j] >= score[i]
                         and (storage[j] < storage[i] or score[j] > score[i])) for j in range(40))
        duplicate_before = any(storage[j] == storage[i] and score[j] == score[i] for j in range(i))
        assert front[i] == (not dominated and not duplicate_before), i
    assert pareto_front(np.array([0.0, 3.0, 1.0]), np.array([0.5, 0.9, 0.7])).tolist() == [True, True, True]


def test_leaderboard_writes_the_figure_beside_it_embeds_it_and_repeats_its_bytes(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "site"
    write_records(results)
    assert main(["leaderboard", "--results-dir", str(results), "--output", str(out / "leaderboard.md")]) == 0
    png = out / figure_name("tiny-bert")
    assert png.name == "leaderboard-tiny-bert.png"
    first = png.read_bytes()
    markdown = (out / "leaderboard.md").read_text()
    heading = markdown.index("## tiny-bert")
    assert markdown.index(f"]({png.name})") > heading and markdown.index("### Protocol: original") > heading
    assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(png_chunks(first))  # no software tag, no time
    # the table itself is the same as without figures: only the image line is added
    plain = leaderboard_markdown(results)
    assert markdown.replace(f"\n\n![tiny-bert: average metric against extra storage]({png.name})", "") == plain
    assert main(["leaderboard", "--results-dir", str(results), "--output", str(out / "leaderboard.md")]) == 0
    assert png.read_bytes() == first


def test_the_figure_has_a_log_panel_per_protocol_the_front_and_seed_error_bars(tmp_path):
    records = write_records(tmp_path)
    rows = mean_over_seeds(latest_per_configuration(records))
    figure = draw(to_frame(rows), "tiny-bert")
    axes = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in axes] == ["protocol: original", "protocol: t-switch-cvpr2025"]
    original = axes[0]
    assert original.get_xscale() == "log"
    zero = zero_position(np.array([0.0, 3.0, 40.0, 3.5]))
    assert zero == pytest.approx(0.1)  # a decade below the smallest stored size (3 MB)
    assert original.get_xticklabels()[0].get_text() == "0" and original.get_xticks()[0] == pytest.approx(zero)
    (front,) = [line for line in original.get_lines() if line.get_label() == "Pareto front"]
    # front: task arithmetic's mean (0 MB, 56 %) then t-switch (3 MB, 70 %); emr-merging is dominated
    assert front.get_xdata().tolist() == pytest.approx([zero, 3.0])
    assert front.get_ydata().tolist() == pytest.approx([100 * statistics.fmean([0.5, 0.62, 0.56]), 70.0])
    (bars,) = original.containers  # only the seed mean has a spread
    (segments,) = bars.lines[2]
    (low, high), = [segment[:, 1] for segment in segments.get_segments()]
    assert high - low == pytest.approx(2 * 100 * statistics.stdev([0.5, 0.62, 0.56]))
    figure.clf()


def test_without_matplotlib_the_table_is_written_and_the_figure_said_skipped(tmp_path, capsys, monkeypatch):
    write_records(tmp_path / "results")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["leaderboard", "--results-dir", str(tmp_path / "results"),
                 "--output", str(tmp_path / "leaderboard.md")]) == 0
    assert "figures skipped: matplotlib is not installed" in capsys.readouterr().err
    assert (tmp_path / "leaderboard.md").read_text() == leaderboard_markdown(tmp_path / "results")
    assert not list(tmp_path.glob("*.png"))


def test_a_redrawn_figure_does_not_mark_the_code_dirty(tmp_path):
    import subprocess

    from mergebench.runner import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "leaderboard-tiny-bert.png").write_bytes(b"one")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "files")
    (tmp_path / "leaderboard-tiny-bert.png").write_bytes(b"two")
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path).endswith("-dirty")
