"""Twin-Merging's truncated SVD: where its time goes, and the randomized SVD's error.

Twin-Merging keeps, per task and matrix, the top-r SVD factors of theta_k - theta_s
(``methods/twin_merging.py``; r = int(0.1 x min(rows, cols)) by default). Two parts:

* **Time per matrix** (``--part time``): one task-vector difference of each matrix shape of
  the synthetic ViT-B/32 (``benchmarks/synthetic_vit.py``), decomposed by each candidate:
  float64 and float32 LAPACK SVDs (torch's thin and full, scipy's gesdd and gesvd drivers),
  ``torch.svd_lowrank`` at its default 2 power iterations, and the method's
  ``svd="randomized"`` (scikit-learn's ``randomized_svd``); CPU seconds (process time, the
  best of ``--repeats``), and each one's total over the model's matrices times K.
* **Error** (``--part error``): for every matrix of every task, on the synthetic ViT-B/32
  (i.i.d. Student-t task vectors: flat spectra, the hard case for a randomized SVD) and on
  the prepared mini suite's real fine-tuned MiniLM-L6 checkpoints (read-only), the
  randomized factors' rank-r Frobenius error divided by the exact optimum (Eckart-Young:
  the root sum of the squared float64 singular values beyond r), at each ``--ratios`` value,
  the largest relative error of its top-r singular values and, for the mini tasks and the
  first synthetic task, the relative Frobenius distance of the expert U S V^T from the
  exact path's; reported per tensor type (the key with its layer index replaced by N) as
  the largest and the median over layers and tasks. A matrix whose sketch would exceed a
  quarter of its smaller side takes the exact path (``svd_factors``): counted, not measured.

    OMP_NUM_THREADS=1 python benchmarks/twin_svd.py --output benchmarks/twin_svd.md --records benchmarks/twin_svd.json

The whole merge's time, before and after, is ``benchmarks/vit_b32_merge.py --methods
twin-merging`` (BENCHMARKS.md, "Twin-Merging merge time").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from tabulate import tabulate

from mergebench.cache import write_atomically, write_json
from mergebench.methods.twin_merging import OVERSAMPLES, TwinMerging, expert_rank, svd_factors, svd_seed
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_vit import SyntheticViTB32  # noqa: E402  (a benchmark fixture beside this script)


def tensor_type(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def shared_expert(pool: ModelPool) -> dict[str, torch.Tensor]:
    return TwinMerging().shared_state(pool)


def matrices(pool: ModelPool, shared: dict[str, torch.Tensor]):
    """(key, task index, delta as a (dim 0, rest) fp32 matrix) of every tensor with >= 2 dims
    that gets experts: as in ``TwinMerging.build``, not one no task changes (the mini suite's
    frozen word embeddings and pooler)."""
    for key in pool.merged_keys:
        if shared[key].dim() < 2:
            continue
        deltas = [pool.finetuned(task, key).float() - shared[key].float() for task in pool.tasks]
        if all(torch.count_nonzero(delta) == 0 for delta in deltas):
            continue
        for index, delta in enumerate(deltas):
            yield key, index, delta.reshape(delta.shape[0], -1)


def cpu_seconds(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def candidates(a: torch.Tensor, r: int) -> dict[str, callable]:
    numpy32 = a.numpy()
    return {
        "float64 thin, torch (exact: the old path)": lambda: torch.linalg.svd(a.double(), full_matrices=False),
        "float64 full_matrices, torch (the authors' call)": lambda: torch.linalg.svd(a.double(), full_matrices=True),
        "float32 thin, torch": lambda: torch.linalg.svd(a, full_matrices=False),
        "float32 thin, scipy gesdd": lambda: scipy.linalg.svd(numpy32, full_matrices=False, lapack_driver="gesdd"),
        "float32 thin, scipy gesvd": lambda: scipy.linalg.svd(numpy32, full_matrices=False, lapack_driver="gesvd"),
        "float32 thin of the tall orientation, torch": lambda: torch.linalg.svd(a if a.shape[0] >= a.shape[1] else a.T,
                                                                                 full_matrices=False),
        f"torch.svd_lowrank q=r+{OVERSAMPLES}, niter=2 (its default)": lambda: torch.svd_lowrank(a, q=r + OVERSAMPLES,
                                                                                              niter=2),
        "randomized (svd=randomized, the default)": lambda: svd_factors(a, r, "randomized", 0),
    }


def time_part(repeats: int) -> dict:
    backbone = SyntheticViTB32(None, num_tasks=8)
    backbone.prepare()
    with ModelPool(backbone) as pool:
        shared = shared_expert(pool)
        counts: dict[tuple[int, int], int] = defaultdict(int)
        examples: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
        for key in pool.merged_keys:
            if shared[key].dim() >= 2:
                shape = (shared[key].shape[0], shared[key][0].numel())
                counts[shape] += 1
                if shape not in examples:
                    delta = (pool.finetuned(pool.tasks[0], key).float() - shared[key].float())
                    examples[shape] = key, delta.reshape(shape).contiguous()
        rows = []
        for shape, (key, a) in examples.items():
            r = expert_rank(shape, "ratio", 0.1, 16)
            for name, fn in candidates(a, r).items():
                rows.append({"shape": list(shape), "example": key, "count": counts[shape], "rank": r,
                             "candidate": name, "cpu_seconds": cpu_seconds(fn, repeats)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return {"tasks": len(pool.tasks), "rows": rows}


def error_rows(pool: ModelPool, ratios: list[float], label: str, source: str, expert_tasks: int) -> list[dict]:
    """One row per (matrix, task, ratio) the randomized SVD decomposes (a matrix that takes the
    exact path is counted, not measured); for the first ``expert_tasks`` tasks also the
    relative Frobenius distance of its expert U S V^T from the exact path's."""
    shared = shared_expert(pool)
    rows = []
    for key, index, a in matrices(pool, shared):
        singular = torch.linalg.svdvals((a if a.shape[0] >= a.shape[1] else a.T).double())  # the tall side: faster
        for ratio in ratios:
            r = expert_rank(tuple(a.shape), "ratio", ratio, 16)
            if r == 0:
                continue
            row = {"pool": label, "source": source, "key": key, "type": tensor_type(key), "task": pool.tasks[index],
                   "shape": list(a.shape), "ratio": ratio, "rank": r,
                   "exact_path": 4 * (r + OVERSAMPLES) > min(a.shape)}
            rows.append(row)
            if row["exact_path"]:
                continue
            start = time.process_time()
            u, s, v = svd_factors(a, r, "randomized", svd_seed(0, key, index))
            seconds = time.process_time() - start
            expert = (u.double() * s.double()) @ v.double().T
            optimum = singular[r:].square().sum().sqrt().item()
            error = (a.double() - expert).norm().item()
            row.update({
                "optimum": optimum, "error": error, "error_ratio": error / optimum if optimum > 0 else 1.0,
                "top_r_relative_error": ((s.double() - singular[:r]).abs() / singular[:r].clamp_min(1e-300)).max().item(),
                "randomized_cpu_seconds": seconds,
            })
            if index < expert_tasks:
                ue, se, ve = svd_factors(a, r, "exact")
                exact = (ue.double() * se.double()) @ ve.double().T
                row["expert_relative_distance"] = ((expert - exact).norm() / exact.norm()).item()
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


POOLS = ("synthetic", "mini")


def error_part(ratios: list[float], pools: list[str]) -> list[dict]:
    rows = []
    if "synthetic" in pools:
        synthetic = SyntheticViTB32(None, num_tasks=8)
        synthetic.prepare()
        with ModelPool(synthetic) as pool:
            rows += error_rows(pool, ratios, "synthetic ViT-B/32", "synthetic", expert_tasks=1)
    if "mini" in pools:
        mini = BACKBONES.get("minilm-l6")()
        with ModelPool(mini) as pool:  # the prepared mini checkpoints, read only
            rows += error_rows(pool, ratios, f"mini MiniLM-L6 ({Path(mini.root).name})", "mini",
                               expert_tasks=len(pool.tasks))
    return rows


def time_table(part: dict) -> str:
    by_candidate: dict[str, float] = defaultdict(float)
    lines = []
    for row in part["rows"]:
        by_candidate[row["candidate"]] += row["cpu_seconds"] * row["count"] * part["tasks"]
        lines.append([f"{row['shape'][0]}x{row['shape'][1]} (x{row['count']}, r={row['rank']})", row["candidate"],
                      f"{row['cpu_seconds']:.3f}"])
    per_matrix = tabulate(lines, headers=["matrix (count in the model, rank)", "SVD", "CPU s"], tablefmt="github",
                          disable_numparse=True)
    totals = tabulate([[name, f"{seconds:.1f}"] for name, seconds in by_candidate.items()],
                      headers=["SVD", f"CPU s for every matrix of the model x K = {part['tasks']}"], tablefmt="github",
                      disable_numparse=True)
    return f"{per_matrix}\n\n{totals}"


def error_table(part: dict) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in part["rows"]:
        groups[(row["pool"], row["ratio"], row["type"])].append(row)
    lines = []
    for (pool, ratio, kind), rows in groups.items():
        head = [pool, f"{ratio:g}", kind, f"{rows[0]['shape'][0]}x{rows[0]['shape'][1]}", str(rows[0]["rank"]),
                str(len(rows))]
        sketched = [r for r in rows if not r["exact_path"]]
        if not sketched:
            lines.append(head + ["exact path"] + [""] * 4)
            continue
        ratios = np.array([r["error_ratio"] for r in sketched])
        distances = [r["expert_relative_distance"] for r in sketched if "expert_relative_distance" in r]
        lines.append(head + [f"{ratios.max():.5f}", f"{np.median(ratios):.5f}",
                             f"{max(r['top_r_relative_error'] for r in sketched):.1e}",
                             f"{max(distances):.1e} ({len(distances)})" if distances else "-",
                             f"{sum(r['randomized_cpu_seconds'] for r in sketched):.1f}"])
    return tabulate(lines, headers=["task vectors", "rank_ratio", "tensor", "shape", "r", "matrices",
                                    "error / optimum, max", "median", "top-r singular values: max rel. error",
                                    "expert vs exact: max rel. distance (matrices)", "randomized CPU s (all)"],
                    tablefmt="github", disable_numparse=True)


def render(records: dict) -> str:
    title = (f"Twin-Merging truncated SVD, {torch.get_num_threads()} torch thread(s), OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    text = [title]
    if "time" in records:
        text.append("### CPU seconds per matrix (synthetic ViT-B/32, one task's difference from the shared expert)\n\n"
                    + time_table(records["time"]))
    if "error" in records:
        text.append("### Randomized SVD: rank-r Frobenius error / the exact optimum\n\n" + error_table(records["error"]))
    return "\n\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "time", "error"), default="all")
    parser.add_argument("--repeats", type=int, default=2, help="timings per candidate (the best is kept)")
    parser.add_argument("--ratios", default="0.1,0.5", help="rank_ratio values of the error part (the default 0.1 "
                        "and the t-switch-cvpr2025 protocol's 0.5)")
    parser.add_argument("--pools", default=",".join(POOLS), help="task vectors of the error part (rows of the "
                        "others stay in the records file)")
    parser.add_argument("--output", type=Path, help="also write the tables as markdown to this file")
    parser.add_argument("--records", type=Path, help="JSON of the measurements: updated with the parts run now")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    records = json.loads(args.records.read_text()) if args.records and args.records.exists() else {}
    if args.part in ("all", "time"):
        records["time"] = time_part(args.repeats)
    if args.part in ("all", "error"):
        pools = [name for name in args.pools.split(",") if name]
        unknown = sorted(set(pools) - set(POOLS))
        if unknown:
            parser.error(f"--pools: unknown {', '.join(unknown)}; expected some of {', '.join(POOLS)}")
        kept = [row for row in records.get("error", {}).get("rows", []) if row.get("source") not in pools]
        records["error"] = {"rows": kept + error_part([float(x) for x in args.ratios.split(",")], pools)}
    records["load_average"] = os.getloadavg()[0]
    if args.records:
        write_json(args.records, records)
    text = render(records)
    print(text)
    if args.output:
        command = "OMP_NUM_THREADS=1 python benchmarks/twin_svd.py" + (f" --output {args.output}") \
            + (f" --records {args.records}" if args.records else "")
        write_atomically(args.output, lambda tmp: tmp.write_text(f"`{command}`\n\n{text}"))


if __name__ == "__main__":
    main()
