"""A sweep on Ray against the same configurations run one after another.

The configurations: ``--methods`` x ``--grid-scaling`` on ``--backbone`` (default
task-arithmetic, ties, dare x scaling 0.1, 0.3, 0.5 on minilm-l6: 9 cheap static merges).
Sequential: ``mergebench.runner.run`` in a loop, in this process (torch's default threads).
Sweep: ``plan_sweep`` + ``run_sweep`` on an embedded Ray with ``--workers`` CPUs, one per
run, Ray's start-up included. Ray's start-up alone is measured separately (``ray.init``,
the first no-op task, which starts a worker, and ``ray.shutdown``). Both write records to
a fresh folder; the averages must agree, or the benchmark fails. Ray gives each worker
one thread (OMP_NUM_THREADS=1) where the loop's torch uses every core, so on a machine
with as many cores as workers the sweep gains only what one run leaves idle.

    python benchmarks/sweep_speed.py [--backbone minilm-l6] [--workers 2] [--cpus-per-run 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from mergebench.runner import run
from mergebench.sweep import plan_sweep, result_key, run_sweep


def ray_startup(workers: int) -> dict[str, float]:
    """Seconds of ``ray.init``, of the first no-op task (a cold worker) and of ``ray.shutdown``."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    init = time.perf_counter() - start
    noop = ray.remote(num_cpus=1)(lambda: None)
    start = time.perf_counter()
    ray.get(noop.remote())
    first_task = time.perf_counter() - start
    start = time.perf_counter()
    ray.shutdown()
    return {"ray.init": init, "first no-op task": first_task, "ray.shutdown": time.perf_counter() - start}


def work(results) -> float:
    """The seconds the runs themselves report (merge and evaluation), summed: what is not
    start-up, loading or scheduling."""
    return sum(r.merge_seconds + r.eval_seconds for r in results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--methods", default="task-arithmetic,ties,dare")
    parser.add_argument("--grid-scaling", default="0.1,0.3,0.5")
    parser.add_argument("--workers", type=int, default=2, help="the CPUs Ray is given")
    parser.add_argument("--cpus-per-run", type=int, default=1, help="2 with --workers 2: one run at a time on two "
                        "threads, as the loop; what the sweep then adds is its overhead")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    grid = {"scaling": [float(value) for value in args.grid_scaling.split(",")]}
    configurations = plan_sweep(methods, [args.backbone], [0], grid)  # prepares the backbone once, untimed

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        sequential = [run(c.plan.method.name, args.backbone, hyperparameters=dict(c.plan.method.hparams),
                          results_dir=Path(folder) / "sequential") for c in configurations]
        sequential_seconds = time.perf_counter() - start

        startup = ray_startup(args.workers)

        start = time.perf_counter()
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            report = run_sweep(configurations, Path(folder) / "sweep", cpus_per_run=args.cpus_per_run, progress=False)
        finally:
            ray.shutdown()
        sweep_seconds = time.perf_counter() - start

    assert not report.failed, report.failed
    by_key = {result_key(r): r.average for r in report.recorded}
    assert by_key == {result_key(r): r.average for r in sequential}, "the sweep's averages differ from the loop's"
    rows = [["configurations", len(configurations)],
            ["sequential run loop (s)", f"{sequential_seconds:.1f}"],
            [f"sweep on {args.workers} CPUs, {args.cpus_per_run} per run, Ray start-up included (s)",
             f"{sweep_seconds:.1f}"],
            ["speed-up", f"{sequential_seconds / sweep_seconds:.2f}x"],
            ["merge + eval inside the runs, summed: sequential (s)", f"{work(sequential):.1f}"],
            ["merge + eval inside the runs, summed: sweep (s)", f"{work(report.recorded):.1f}"],
            *[[f"Ray start-up: {name} (s)", f"{seconds:.2f}"] for name, seconds in startup.items()]]
    print(tabulate(rows, headers=["", args.backbone], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
