"""A sweep on Ray against the same configurations run one after another.

The configurations: ``--methods`` x ``--grid-scaling`` on ``--backbone`` (default
task-arithmetic, ties, dare x scaling 0.1, 0.3, 0.5 on minilm-l6: 9 cheap static merges).
Sequential: ``mergebench.runner.run`` in a loop, in this process (torch's default threads);
with ``--cli-loop`` also one ``mergebench run`` process per configuration, as a shell loop
runs them. Sweep: ``plan_sweep`` + ``run_sweep`` on an embedded Ray with ``--workers`` CPUs,
``--cpus-per-run`` each (a run uses that many torch threads), Ray's start-up included. The
arms run in one command, ``--repeats`` rounds interleaved (order alternating), medians
reported with the 1-minute load average at each arm's start. Ray's start-up alone is
measured separately (``ray.init``, the first no-op task, which starts a worker, and
``ray.shutdown``). Every arm writes records to a fresh folder; their averages must agree,
or the benchmark fails. On a machine with as many cores as workers the in-process loop
already keeps every core busy (torch's intra-op threads), so the sweep gains only what one
run leaves idle; over a shell loop it also saves each process's start-up.

    python benchmarks/sweep_speed.py [--backbone minilm-l6] [--workers 2] [--cpus-per-run 1] [--repeats 2] [--cli-loop]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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


def cli_loop(configurations, backbone: str, folder: Path) -> list:
    """Each configuration as its own ``mergebench run`` process, as a shell loop runs them:
    every process pays Python's and torch's start-up and loads the backbone again."""
    from mergebench.results import load_results

    command = str(Path(sys.executable).with_name("mergebench"))
    for configuration in configurations:
        hparams = [f"--hp={key}={value}" for key, value in configuration.plan.method.overrides.items()]
        subprocess.run([command, "run", "--method", configuration.plan.method.name, "--backbone", backbone, *hparams,
                        "--results-dir", str(folder)], check=True, capture_output=True)
    return load_results(folder)


def sweep(configurations, folder: Path, workers: int, cpus_per_run: int) -> list:
    """run_sweep on an embedded Ray of ``workers`` CPUs, Ray's start-up and shutdown included."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        report = run_sweep(configurations, folder, cpus_per_run=cpus_per_run, progress=False)
    finally:
        ray.shutdown()
    assert not report.failed, report.failed
    return report.recorded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--methods", default="task-arithmetic,ties,dare")
    parser.add_argument("--grid-scaling", default="0.1,0.3,0.5")
    parser.add_argument("--workers", type=int, default=2, help="the CPUs Ray is given")
    parser.add_argument("--cpus-per-run", type=int, default=1, help="2 with --workers 2: one run at a time on two "
                        "threads, as the loop; what the sweep then adds is its overhead")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the arms, interleaved (medians reported)")
    parser.add_argument("--cli-loop", action="store_true", help="also time one `mergebench run` process per "
                        "configuration (a shell loop)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    grid = {"scaling": [float(value) for value in args.grid_scaling.split(",")]}
    configurations = plan_sweep(methods, [args.backbone], [0], grid)  # prepares the backbone once, untimed

    arms = {"sequential run loop, in one process": lambda folder: [
                run(c.plan.method.name, args.backbone, hyperparameters=dict(c.plan.method.overrides),
                    results_dir=folder) for c in configurations],
            f"sweep on {args.workers} CPUs, {args.cpus_per_run} per run, Ray start-up included":
                lambda folder: sweep(configurations, folder, args.workers, args.cpus_per_run)}
    if args.cli_loop:
        arms["`mergebench run` loop, one process per configuration"] = \
            lambda folder: cli_loop(configurations, args.backbone, folder)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    loads: dict[str, list[float]] = {name: [] for name in arms}
    records: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            names = list(arms) if repeat % 2 == 0 else list(reversed(arms))  # interleaved, order alternating
            for number, name in enumerate(names):
                loads[name].append(os.getloadavg()[0])
                start = time.perf_counter()
                records[name] = arms[name](Path(folder) / f"{repeat}-{number}")
                seconds[name].append(time.perf_counter() - start)
        startup = ray_startup(args.workers)

    averages = {name: {result_key(r): r.average for r in found} for name, found in records.items()}
    first = next(iter(averages.values()))
    for name, found in averages.items():
        assert found == first, f"{name}: averages {sorted(found.values())} differ from {sorted(first.values())}"
    loop = statistics.median(seconds[next(iter(arms))])
    rows = [["configurations", len(configurations)]]
    for name in arms:
        median = statistics.median(seconds[name])
        rows.append([f"{name} (s)", f"{median:.1f} (load {statistics.mean(loads[name]):.1f})"])
        if name != next(iter(arms)):
            rows.append([f"  speed-up over the in-process loop", f"{loop / median:.2f}x"])
    sweep_name = list(arms)[1]
    rows += [["merge + eval inside the runs, summed: loop (s)", f"{work(records[next(iter(arms))]):.1f}"],
             ["merge + eval inside the runs, summed: sweep (s)", f"{work(records[sweep_name]):.1f}"],
             *[[f"Ray start-up: {name} (s)", f"{value:.2f}"] for name, value in startup.items()]]
    if args.cli_loop:
        cli = statistics.median(seconds[list(arms)[2]])
        rows.append(["sweep speed-up over the `mergebench run` loop", f"{cli / statistics.median(seconds[sweep_name]):.2f}x"])
    print(tabulate(rows, headers=["", f"{args.backbone}, {args.repeats} round(s), medians"], tablefmt="github",
                   disable_numparse=True))


if __name__ == "__main__":
    main()
