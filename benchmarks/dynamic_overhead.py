"""Cost of dynamic inference as a ratio to one plain forward pass of the same batch.

For each batch size, times (median of --repeat runs, after one warm-up that fills
the merged-weight cache) the pretrained encoder + head (the baseline), T-Switch
(task identity, one cached weight set) and Auto-Switch (k-NN routing forward,
then one forward per group of equal routing weights), on test inputs mixed from
every task of the suite so that routing really has several groups.

    python benchmarks/dynamic_overhead.py --backbone minilm-l6 --batch-sizes 1 32 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from mergebench.method import StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES
from mergebench.runner import draw_exemplars, make_method


def mixed_batch(backbone, size: int):
    """``size`` test inputs taken round-robin from every task, padded together."""
    texts = []
    per_task = [backbone.data(t.name).test for t in backbone.tasks]
    for i in range(size):
        examples = per_task[i % len(per_task)]
        texts.append(examples[(i // len(per_task)) % len(examples)][0])
    return backbone.tokenize(texts)


def timed(function, repeat: int) -> float:
    function()  # warm-up: fills caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args()

    backbone = BACKBONES.get(args.backbone)()
    backbone.prepare()
    torch.manual_seed(0)
    with ModelPool(backbone) as pool:
        task = pool.tasks[0]
        plain = StaticMerged(backbone, pool.pretrained_state())
        t_switch = make_method("t-switch").merge(pool)
        auto = make_method("auto-switch")
        auto_switch = auto.merge(pool, draw_exemplars(backbone, pool.tasks, auto.exemplars_per_task, 0))
        rows = []
        for size in args.batch_sizes:
            inputs = mixed_batch(backbone, size)
            groups = len(torch.unique(auto_switch.routing_weights(task, inputs), dim=0))
            base = timed(lambda: plain.predict(task, inputs), args.repeat)
            ts = timed(lambda: t_switch.predict(task, inputs), args.repeat)
            auto_switch._cache.clear()
            cold_start = time.perf_counter()
            auto_switch.predict(task, inputs)
            cold = time.perf_counter() - cold_start
            warm = timed(lambda: auto_switch.predict(task, inputs), args.repeat)
            rows.append([size, groups, f"{1000 * base:.1f}", f"{ts / base:.2f}", f"{warm / base:.2f}", f"{cold / base:.2f}"])
    table = tabulate(rows, headers=["batch", "routing groups", "plain forward (ms)", "T-Switch ×", "Auto-Switch × (cached)",
                                    "Auto-Switch × (cold cache)"], tablefmt="github")
    print(table)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(f"`python benchmarks/dynamic_overhead.py --backbone {args.backbone}`\n\n{table}\n")


if __name__ == "__main__":
    main()
