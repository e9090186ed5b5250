"""Cost of dynamic inference as a ratio to one plain forward pass of the same batch.

For each batch size, times (median of --repeat runs, after one warm-up that fills
the merged-weight cache) the pretrained encoder + head (the baseline) and every
dynamic method: T-Switch and EMR-Merging (task identity: one cached weight set),
Auto-Switch (k-NN routing forward, then one forward per group of equal routing
weights), Twin-Merging (router forward on shared-expert features, then one forward
with per-input low-rank corrections) and Auto-FlexSwitch when it is registered.
Inputs are test inputs mixed from every task of the suite, so that routing really
has several groups. *Cold*: the merged-weight cache emptied before the batch
(methods that build merged weights per routing group; Twin-Merging has no cache, its
cold figure is one more timing of the same work). Several routing groups run as one
layered forward (``ComposedMerged._layered``); the *grouped* column times the previous
path, one forward per group under its whole weight set, in the same process, and the
*routing* column the router alone (its forward and the k-NN search or MLP).

    OMP_NUM_THREADS=1 python benchmarks/dynamic_overhead.py --backbone minilm-l6 --batch-sizes 1 32 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

from mergebench.dynamic import ComposedMerged
from mergebench.exemplars import draw_exemplars
from mergebench.method import StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES, METHODS
from mergebench.runner import make_method

DYNAMIC = ["t-switch", "emr-merging", "auto-switch", "twin-merging", "auto-flexswitch"]
# Inference cost does not depend on how long the switches were trained (the composed weights
# are dense either way), so the benchmark trains Auto-FlexSwitch briefly; --full-training
# uses the method's defaults.
SHORT_TRAINING = {"auto-flexswitch": {"steps": 20}}


def mixed_batch(backbone, size: int):
    """``size`` test inputs taken round-robin from every task, padded together."""
    texts = []
    per_task = [backbone.data(t.name).test for t in backbone.tasks]
    for i in range(size):
        examples = per_task[i % len(per_task)]
        texts.append(examples[(i // len(per_task)) % len(examples)][0])
    return backbone.tokenize(texts)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def timed(function, repeat: int) -> float:
    function()  # warm-up: fills caches
    times = []
    for _ in range(repeat):
        start = clock()
        function()
        times.append(clock() - start)
    return statistics.median(times)


def cold_time(model, task: str, inputs) -> float:
    """One prediction with the merged-weight cache emptied first (where there is one)."""
    if isinstance(model, ComposedMerged):
        model.clear_cache()
    start = clock()
    model.predict(task, inputs)
    return clock() - start


def routing_groups(merged, task: str, inputs) -> str:
    """How many distinct weight vectors the batch is split into (one forward each)."""
    if isinstance(merged, ComposedMerged):
        return str(len(torch.unique(merged.routing_weights(task, inputs), dim=0)))
    return "- (per-input low-rank hooks)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--methods", default=",".join(DYNAMIC), help="comma-separated dynamic methods")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", help="also write the table to this markdown file")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="cpu: process time (with OMP_NUM_THREADS=1 the wall time of an idle machine, robust to "
                             "other jobs); wall: elapsed time")
    parser.add_argument("--full-training", action="store_true", help=f"no shortened training ({SHORT_TRAINING})")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]

    registered = set(METHODS.names())
    wanted = [m for m in args.methods.split(",") if m]
    missing = [m for m in wanted if m not in registered]  # e.g. auto-flexswitch before it lands
    backbone = BACKBONES.get(args.backbone)()
    backbone.prepare()
    torch.manual_seed(0)
    rows = []
    with ModelPool(backbone) as pool:
        task = pool.tasks[0]
        plain = StaticMerged(backbone, pool.pretrained_state())
        merged = {}
        for name in (m for m in wanted if m in registered):
            method = make_method(name, {} if args.full_training else SHORT_TRAINING.get(name, {}))
            exemplars = draw_exemplars(backbone, pool.tasks, method.exemplars_per_task, 0) if method.needs_exemplars else None
            merged[name] = method.merge(pool, exemplars)
        for size in args.batch_sizes:
            inputs = mixed_batch(backbone, size)
            base = timed(lambda: plain.predict(task, inputs), args.repeat)
            for name, model in merged.items():
                warm = timed(lambda: model.predict(task, inputs), args.repeat)
                routing = "-"
                if model.router is not None:
                    routing = f"{timed(lambda: model.routing_weights(task, inputs), args.repeat) / base:.2f}"
                cold, grouped = cold_time(model, task, inputs), "-"
                if isinstance(model, ComposedMerged) and model._plan is not None and routing_groups(model, task, inputs) != "1":
                    plan, model._plan = model._plan, None  # the grouped path: one forward per group
                    try:
                        grouped = f"{cold_time(model, task, inputs) / base:.2f}"
                    finally:
                        model._plan = plan
                rows.append([size, f"{1000 * base:.1f}", name, routing_groups(model, task, inputs), routing,
                             f"{warm / base:.2f}", f"{cold / base:.2f}", grouped])
    table = tabulate(rows, headers=["batch", f"plain forward ({args.clock} ms)", "method", "routing groups", "routing × plain",
                                    "× plain (cached)", "× plain (cold cache)", "× plain (cold, grouped)"],
                     tablefmt="github", disable_numparse=True)
    note = f"\n\nNot registered, left out: {', '.join(missing)}." if missing else ""
    shortened = {m: o for m, o in SHORT_TRAINING.items() if m in merged and not args.full_training}
    note += f"\n\nShortened training for the timing: {shortened}." if shortened else ""
    print(table + note)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(f"`OMP_NUM_THREADS=1 python benchmarks/dynamic_overhead.py --backbone {args.backbone} "
                         f"--clock {args.clock}`\n\n{table}{note}\n")


if __name__ == "__main__":
    main()
