"""TIES trim thresholds at ViT-B/32 scale: counting (``mergebench.sparsify.trim_thresholds``)
against the reference that concatenates each task vector and takes its k-th value with
``torch.kthvalue`` (what ``trim_thresholds`` did before), on the synthetic checkpoints of
``benchmarks/synthetic_vit.py``. One torch thread; CPU seconds of this process, the
growth of its anonymous memory (peak minus before, sampled every 5 ms), whether the
thresholds are identical, and the 1-minute load average.

    OMP_NUM_THREADS=1 python benchmarks/ties_thresholds.py --output benchmarks/ties_thresholds.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_merge import AnonPeak, _rss_anon  # noqa: E402  (benchmark helpers beside this script)
from synthetic_vit import SyntheticViTB32  # noqa: E402

MB = 1_000_000


def sorted_reference(pool, keep: float) -> list[float]:
    thresholds = []
    for task in pool.tasks:
        magnitudes = torch.cat([pool.task_vector(task, key).abs().flatten().float() for key in pool.merged_keys])
        n = magnitudes.numel()
        thresholds.append(float(magnitudes.kthvalue(min(max(n - int(n * keep), 1), n)).values))
        del magnitudes
    return thresholds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mergebench.runner import load_pool
    from mergebench.sparsify import trim_thresholds

    backbone = SyntheticViTB32(num_tasks=args.tasks)
    backbone.prepare()
    rows, results = [], {}
    with load_pool(backbone) as pool:
        for name, compute in (("counting (trim_thresholds)", trim_thresholds), ("concatenate + kthvalue", sorted_reference)):
            load = os.getloadavg()[0]
            before = _rss_anon()
            with AnonPeak() as peak:
                cpu, wall = time.process_time(), time.perf_counter()
                results[name] = compute(pool, args.keep)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rows.append(f"| {name} | {cpu:.1f} | {wall:.1f} | {(peak.peak - before) / MB:,.0f} | {load:.1f} |")
    same = len(set(map(tuple, results.values()))) == 1
    text = (f"TIES trim thresholds (keep {args.keep}) of {args.tasks} synthetic ViT-B/32 task vectors, one torch thread, "
            f"{os.cpu_count()} CPUs; thresholds identical: {same}\n\n"
            "| thresholds by | CPU s | wall s | anon growth MB | load |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    if args.output:
        args.output.write_text("`OMP_NUM_THREADS=1 python benchmarks/ties_thresholds.py"
                               + (f" --tasks {args.tasks}" if args.tasks != 8 else "") + f" --output {args.output}`\n\n" + text)
    if not same:
        raise SystemExit("the thresholds differ")


if __name__ == "__main__":
    main()
