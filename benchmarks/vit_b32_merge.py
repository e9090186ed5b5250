"""Merge time, peak memory and extra storage of every method at ViT-B/32 scale.

The backbone is ``benchmarks/synthetic_vit.py``: a random-init CLIP ViT-B/32 vision
tower (87.5M parameters, 350 MB fp32) and K = 8 fine-tuned copies with Student-t
task vectors, written once as safetensors and read by the real ``ModelPool``. Each
method runs in its own subprocess, so peaks do not mix. Per method:

* merge seconds, CPU (process time, robust to other jobs on a shared machine) and
  wall: the ``timed_merge`` stage of ``mergebench.runner`` alone; before it, ``load_pool``
  has checked the checkpoints against the prepare manifest and the pool has opened and
  verified each one, as in ``mergebench run`` (reported apart as *validate s*);
* memory: the process's anonymous resident memory (heap: tensors the method
  allocates), sampled every 5 ms during the merge, minus its value just before;
  and ``ru_maxrss`` (all resident pages, including the pages of the memory-mapped
  checkpoints the pool reads, which are page cache the kernel can drop), minus
  the resident size just before (the kernel may drop mapped pages meanwhile, so this
  can be below the heap growth). The heap growth is also given as a multiple of one
  model (the fp32 bytes of the merged tensors);
* extra storage: ``Merged.storage_bytes()``, the bytes of the serialized artifacts;
* for a dynamic method that composes weights (``ComposedMerged``), the CPU seconds of
  composing one weight vector after the merge: one-hot on one task, and 1/K on all K;
* the machine's 1-minute load average when the method finished (the machine may be
  shared: CPU seconds are robust to that, wall seconds are not).

Methods that need exemplars get synthetic images (``--exemplars`` per task).

    OMP_NUM_THREADS=1 python benchmarks/vit_b32_merge.py --records benchmarks/vit_b32_merge.json \\
        --output benchmarks/vit_b32_merge.md
    OMP_NUM_THREADS=1 python benchmarks/vit_b32_merge.py --tasks 16 --methods t-switch,auto-switch \\
        --records benchmarks/vit_b32_merge_k16.json --output benchmarks/vit_b32_merge_k16.md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from tabulate import tabulate

from mergebench.cache import write_atomically, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_vit import SyntheticViTB32  # noqa: E402  (a benchmark fixture beside this script)

METHODS = ["weight-averaging", "task-arithmetic", "ties", "dare", "emr-merging", "t-switch", "auto-switch", "twin-merging"]
MB = 1_000_000


def _status() -> dict[str, int]:
    """VmRSS and RssAnon of this process, in bytes (Linux /proc)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                values[name] = int(rest.split()[0]) * 1024
    return values


class PeakSampler:
    """Largest RssAnon seen by a background thread polling /proc every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = _status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])


def worker(method_name: str, root: Path, num_tasks: int, exemplars_per_task: int) -> dict:
    """Runs in the subprocess: merge once, measure, print one JSON line."""
    import torch

    from mergebench.registry import METHODS as REGISTRY
    from mergebench.runner import exemplars_for, load_pool, make_method, seed_everything, timed_merge

    backbone = SyntheticViTB32(root, num_tasks=num_tasks)
    overrides = {"exemplars": exemplars_per_task} if REGISTRY.get(method_name).needs_exemplars else {}
    method = make_method(method_name, overrides)
    start = time.perf_counter()
    with load_pool(backbone) as pool:  # the run's stages from here on, as `mergebench run` calls them
        for task in pool.tasks:  # the pool verifies each checkpoint when it first opens it
            pool.finetuned(task, pool.merged_keys[0])
        validate_seconds = time.perf_counter() - start
        model_bytes = sum(pool.pretrained(k).numel() * 4 for k in pool.merged_keys)
        seed_everything(0)
        exemplars = exemplars_for(method, backbone, pool.tasks, 0)
        before = _status()
        with PeakSampler() as sampler:
            cpu = time.process_time()
            merged, merge_seconds = timed_merge(method, pool, exemplars)
            merge_cpu = time.process_time() - cpu
        storage = merged.storage_bytes()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        compose = {}
        if hasattr(merged, "merged_parameters"):  # composing one weight vector: one task, then all K at 1/K
            for name, weights in (("one", torch.eye(len(pool.tasks))[0]), ("all", torch.full((len(pool.tasks),), 1 / len(pool.tasks)))):
                merged.clear_cache()
                cpu = time.process_time()
                merged.merged_parameters(weights)
                compose[name] = time.process_time() - cpu
            merged.clear_cache()
        task = pool.tasks[0]
        inputs, _ = next(backbone.task(task).batches("test", 2))
        logits = merged.predict(task, inputs)  # the merged model works
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    return {
        "method": method_name, "hyperparameters": method.hparams, "merge_seconds": merge_seconds, "merge_cpu_seconds": merge_cpu,
        "validate_seconds": validate_seconds, "model_bytes": model_bytes, "storage_bytes": storage,
        "anon_before": before["RssAnon"], "anon_peak": sampler.peak, "rss_before": before["VmRSS"], "rss_peak": peak_rss,
        "threads": torch.get_num_threads(), "compose_cpu_seconds": compose, "load_average": os.getloadavg()[0],
    }


def run_method(method: str, root: Path, num_tasks: int, exemplars: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--root", str(root), "--tasks", str(num_tasks),
               "--exemplars", str(exemplars)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], "failed: " + r["error"], *[""] * 9])
            continue
        model = r["model_bytes"]
        anon = r["anon_peak"] - r["anon_before"]
        rss = r["rss_peak"] - r["rss_before"]
        rows.append([
            r["method"], f"{r['merge_cpu_seconds']:.1f}", f"{r['merge_seconds']:.1f}", f"{r['validate_seconds']:.1f}",
            f"{anon / MB:,.0f}", f"{anon / model:.2f}", f"{rss / MB:,.0f}",
            f"{r['storage_bytes'] / MB:.1f}" if r["storage_bytes"] else "-",
            "/".join(f"{r['compose_cpu_seconds'][k]:.2f}" for k in ("one", "all")) if r.get("compose_cpu_seconds") else "-",
            f"{r['load_average']:.1f}" if "load_average" in r else "?",
            ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()) or "-",
        ])
    return tabulate(rows, headers=["method", "merge CPU s", "merge wall s", "validate s", "peak heap MB", "heap / model",
                                   "peak RSS MB (incl. mapped checkpoints)", "extra storage MB",
                                   "compose CPU s (1 task / all K)", "load", "hyperparameters"],
                    tablefmt="github", disable_numparse=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--exemplars", type=int, default=16,
                        help="synthetic exemplars per task for methods that need them (default 16: ViT-B/32 "
                             "forwards are the cost on CPU; merge time grows linearly with them)")
    parser.add_argument("--root", type=Path, help="where the synthetic checkpoints live (default: in $MERGEBENCH_CACHE)")
    parser.add_argument("--output", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("--records", type=Path, help="JSON file of per-method measurements: updated with this run's "
                        "methods, and the table shows every method it holds (rerun one method without losing the rest)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.root, args.tasks, args.exemplars)))
        return
    backbone = SyntheticViTB32(args.root, num_tasks=args.tasks)
    backbone.prepare()
    results = {}
    if args.records and args.records.exists():
        results = json.loads(args.records.read_text())
    for method in [m for m in args.methods.split(",") if m]:
        print(f"{method} ...", file=sys.stderr, flush=True)
        results[method] = run_method(method, backbone.root, args.tasks, args.exemplars)
        print(json.dumps(results[method]), file=sys.stderr, flush=True)
        if args.records:
            write_json(args.records, results)
    order = {name: i for i, name in enumerate(METHODS)}
    results = [results[m] for m in sorted(results, key=lambda m: order.get(m, len(order)))]
    threads = next((r["threads"] for r in results if "threads" in r), "?")
    model = next((r["model_bytes"] for r in results if "model_bytes" in r), 0)
    title = (f"Merging {args.tasks} synthetic ViT-B/32 task vectors (one model = {model / MB:.0f} MB fp32), "
             f"{threads} torch thread(s), exemplars {args.exemplars}/task where needed; OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    text = f"{title}\n\n{table(results)}\n"
    print(text)
    if args.output:
        command = "OMP_NUM_THREADS=1 python benchmarks/vit_b32_merge.py" + (f" --tasks {args.tasks}" if args.tasks != 8 else "") \
            + (f" --records {args.records}" if args.records else "") \
            + f" --output {args.output}"
        rerun = " (the rows come from the records file; `--methods NAME` reruns one)" if args.records else ""
        write_atomically(args.output, lambda tmp: tmp.write_text(f"`{command}`{rerun}\n\n{text}"))


if __name__ == "__main__":
    main()
