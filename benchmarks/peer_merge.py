"""Static merges side by side: mergebench, FusionBench and mergekit on the same checkpoints.

The checkpoints are ``benchmarks/synthetic_vit.py``'s: a random-init CLIP ViT-B/32 vision
tower and K = 8 fine-tuned copies (350 MB fp32 each). mergebench reads them as they are;
FusionBench and mergekit read Hugging Face copies of the same tensors (``config.json`` +
``model.safetensors`` per model, written once beside them), as their users would.

Each (implementation, method) pair runs in its own process, one torch thread; the
process imports everything first (torch, transformers' CLIP, the implementation), then
measures *load + merge*: from the checkpoint paths to the merged model (mergebench: the
run's ``load_pool`` stage, which verifies every checkpoint against the prepare manifest,
and ``timed_merge``, which returns the merged encoder; FusionBench: its model pool and
algorithm's ``run``; mergekit: ``run_merge``, which writes the merged model to a
temporary folder). Per run: wall seconds, CPU seconds of the process, and the growth of
its anonymous resident memory (``RssAnon``, sampled every 5 ms, peak minus the value just
before; the memory-mapped checkpoints are page cache, not anonymous memory). The repeats
are interleaved (repeat 1 of every pair, then repeat 2, ...), the table gives the median,
and the 1-minute load average of the machine is recorded beside each run: the machine
may be shared, so compare the arms of one table, not tables of different days.

Methods and settings (each implementation's own algorithm and defaults of its config):
weight averaging (FusionBench ``SimpleAverageAlgorithm``; mergekit ``linear``, equal
weights), task arithmetic (lambda = 0.3; mergekit ``task_arithmetic`` with weight 0.3,
no normalisation) and TIES (k = 20 %, lambda = 0.3; FusionBench ``TiesMergingAlgorithm``
threshold 20, merge_func sum; mergekit ``ties`` with density 0.2, weight 0.3, no
normalisation: mergekit trims each tensor on its own, the others over the whole task
vector).

    OMP_NUM_THREADS=1 python benchmarks/peer_merge.py --output benchmarks/peer_merge.md --records benchmarks/peer_merge.json

After a change to one method, ``--methods ties --update`` reruns that method's arms only and
keeps the other methods' runs from the records file (every run carries its date).

Needs the ``bench`` extra (``pip install -e .[bench]``); a peer that is not installed is
left out of the table and named under it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("weight-averaging", "task-arithmetic", "ties")
IMPLEMENTATIONS = {"mergebench": "mergebench", "fusion-bench": "fusion_bench", "mergekit": "mergekit"}
SCALING, KEEP = 0.3, 0.2
MB = 1_000_000


def _rss_anon() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class AnonPeak:
    """Largest RssAnon seen by a thread polling every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_anon())

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


# --- the Hugging Face copies the peers read ------------------------------------------------
def hf_dirs(backbone) -> dict[str, Path]:
    """``_pretrained_`` and every task -> a folder with config.json and model.safetensors
    (the synthetic checkpoint's tensors under CLIPVisionModel's names), written if missing."""
    folders = {"_pretrained_": backbone.root / "hf" / "pretrained"}
    folders.update({task: backbone.root / "hf" / task for task in backbone.task_names})
    sources = {"_pretrained_": backbone.pretrained_checkpoint()}
    sources.update({task: backbone.finetuned_checkpoint(task) for task in backbone.task_names})
    for name, folder in folders.items():
        target = folder / "model.safetensors"
        if target.exists() and target.stat().st_mtime >= sources[name].stat().st_mtime:
            continue
        from safetensors.torch import load_file, save_file
        from transformers import CLIPVisionConfig

        from synthetic_vit import VIT_B32

        folder.mkdir(parents=True, exist_ok=True)
        config = CLIPVisionConfig(**VIT_B32)
        config.architectures = ["CLIPVisionModel"]
        config.save_pretrained(folder)
        state = {key.removeprefix("model."): value for key, value in load_file(str(sources[name])).items()}
        tmp = target.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(target)
    return folders


# --- the arms (run in the worker process; everything is imported before the clock starts) ----
def arm_mergebench(method: str, backbone, folders):
    from mergebench.registry import METHODS as REGISTRY  # noqa: F401  (registers the plugins)
    from mergebench.runner import load_pool, make_method, timed_merge

    hparams = {"weight-averaging": {}, "task-arithmetic": {"scaling": SCALING},
               "ties": {"keep": KEEP, "scaling": SCALING}}[method]
    made = make_method(method, hparams)

    def run():
        with load_pool(backbone) as pool:
            merged, _ = timed_merge(made, pool)
        return merged

    return run


def arm_fusion_bench(method: str, backbone, folders):
    from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool

    def run():
        pool = CLIPVisionModelPool(models={name: str(folder) for name, folder in folders.items()})
        if method == "weight-averaging":
            algorithm = SimpleAverageAlgorithm()
        elif method == "task-arithmetic":
            algorithm = TaskArithmeticAlgorithm(scaling_factor=SCALING)
        else:
            algorithm = TiesMergingAlgorithm(scaling_factor=SCALING, threshold=int(KEEP * 100), remove_keys=[],
                                             merge_func="sum")
        return algorithm.run(pool)

    return run


def arm_mergekit(method: str, backbone, folders):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    tasks = [str(folders[task]) for task in backbone.task_names]
    if method == "weight-averaging":
        config = {"merge_method": "linear", "models": [{"model": t, "parameters": {"weight": 1.0}} for t in tasks]}
    else:
        parameters = {"weight": SCALING} if method == "task-arithmetic" else {"weight": SCALING, "density": KEEP}
        config = {"merge_method": "task_arithmetic" if method == "task-arithmetic" else "ties",
                  "base_model": str(folders["_pretrained_"]), "parameters": {"normalize": False},
                  "models": [{"model": t, "parameters": parameters} for t in tasks]}
    config["dtype"] = "float32"
    merge_config = MergeConfiguration.model_validate(config)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, num_threads=1)

    def run():
        with tempfile.TemporaryDirectory(prefix="mergekit-out-") as out:
            run_merge(merge_config, out, options=options)

    return run


ARMS = {"mergebench": arm_mergebench, "fusion-bench": arm_fusion_bench, "mergekit": arm_mergekit}


def worker(implementation: str, method: str, num_tasks: int) -> dict:
    import torch
    import transformers.models.clip.modeling_clip  # noqa: F401  (imports are not timed)

    from synthetic_vit import SyntheticViTB32

    torch.set_num_threads(1)
    backbone = SyntheticViTB32(num_tasks=num_tasks)
    folders = hf_dirs(backbone)
    run = ARMS[implementation](method, backbone, folders)
    load_before = _load()
    before = _rss_anon()
    with AnonPeak() as peak:
        cpu, wall = time.process_time(), time.perf_counter()
        result = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del result
    return {"implementation": implementation, "method": method, "wall_seconds": wall, "cpu_seconds": cpu,
            "anon_growth_bytes": peak.peak - before, "load_before": load_before, "load_after": _load(),
            "threads": torch.get_num_threads()}


def run_worker(implementation: str, method: str, num_tasks: int) -> dict:
    command = [sys.executable, __file__, "--worker", implementation, method, "--tasks", str(num_tasks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"implementation": implementation, "method": method, "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    return {key: statistics.median(r[key] for r in runs)
            for key in ("wall_seconds", "cpu_seconds", "anon_growth_bytes", "load_before")}


def table(records: dict, implementations: list[str], num_tasks: int) -> str:
    from tabulate import tabulate

    rows = []
    for method in METHODS:
        row = [method]
        for implementation in implementations:
            summary = records.get(method, {}).get(implementation)
            if summary is None:
                row.append("-")
            elif "error" in summary:
                row.append("failed: " + summary["error"][:80])
            else:
                row.append(f"{summary['wall_seconds']:.2f} s wall, {summary['cpu_seconds']:.2f} s CPU, "
                           f"+{summary['anon_growth_bytes'] / MB:,.0f} MB anon (load {summary['load_before']:.1f})")
        fastest = [s["wall_seconds"] for i, s in records.get(method, {}).items() if i != "mergebench" and "error" not in s]
        fastest_cpu = [s["cpu_seconds"] for i, s in records.get(method, {}).items() if i != "mergebench" and "error" not in s]
        leanest = [s["anon_growth_bytes"] for i, s in records.get(method, {}).items() if i != "mergebench" and "error" not in s]
        ours = records.get(method, {}).get("mergebench")
        if ours and "error" not in ours and fastest:
            row.append(f"{ours['wall_seconds'] / min(fastest):.2f}x wall, {ours['cpu_seconds'] / min(fastest_cpu):.2f}x CPU, "
                       f"{ours['anon_growth_bytes'] / min(leanest):.2f}x anon")
        else:
            row.append("-")
        rows.append(row)
    return tabulate(rows, headers=["method", *implementations, "mergebench / best peer"], tablefmt="github",
                    disable_numparse=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated implementation:method pairs not to run, "
                        "e.g. fusion-bench:ties (FusionBench's TIES holds about 19 GB: too much for a shared machine)")
    parser.add_argument("--output", type=Path, help="also write the table as markdown here")
    parser.add_argument("--records", type=Path, help="also write every run as JSON here")
    parser.add_argument("--update", action="store_true", help="rerun only --methods and keep the other methods' "
                        "runs and summaries from the existing --records file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(*args.worker, args.tasks)))
        return
    previous = {"summary": {}, "runs": []}
    if args.update:
        if args.records is None or not args.records.exists():
            parser.error("--update needs an existing --records file to keep the other methods' runs from")
        previous = json.loads(args.records.read_text())
    from synthetic_vit import SyntheticViTB32

    backbone = SyntheticViTB32(num_tasks=args.tasks)
    backbone.prepare()
    from mergebench.manifest import prepare_checkpoints

    prepare_checkpoints(backbone)  # the manifest and file hashes exist before any timed run, as after `prepare`
    hf_dirs(backbone)
    wanted = [i for i in args.implementations.split(",") if i]
    unknown = [i for i in wanted if i not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLEMENTATIONS)}")
    missing = [i for i in wanted if importlib.util.find_spec(IMPLEMENTATIONS[i]) is None]
    implementations = [i for i in wanted if i not in missing]
    methods = [m for m in args.methods.split(",") if m]
    runs: list[dict] = []
    for repeat in range(args.repeats):  # interleaved: every pair once, then again
        for method in methods:
            for implementation in implementations:
                if f"{implementation}:{method}" in args.skip.split(","):
                    continue
                print(f"repeat {repeat + 1}: {implementation} {method} ...", file=sys.stderr, flush=True)
                record = run_worker(implementation, method, args.tasks)
                record["repeat"] = repeat
                record["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                print(json.dumps(record), file=sys.stderr, flush=True)
                runs.append(record)
    records = {method: {i: summarise([r for r in runs if r["method"] == method and r["implementation"] == i])
                        for i in implementations if f"{i}:{method}" not in args.skip.split(",")} for method in methods}
    kept = [m for m in METHODS if m in previous["summary"] and m not in methods]
    records = {m: records[m] if m in records else previous["summary"][m] for m in METHODS if m in records or m in kept}
    runs = [r for r in previous["runs"] if r["method"] in kept] + runs
    implementations = [i for i in IMPLEMENTATIONS if i in implementations or any(i in records[m] for m in kept)]
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("mergebench", "fusion-bench", "mergekit", "torch", "transformers", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    title = (f"Load + merge of {args.tasks} synthetic ViT-B/32 checkpoints (350 MB fp32 each), one torch thread, "
             f"median of {args.repeats} interleaved runs, each in its own process, imports excluded; "
             f"{os.cpu_count()} CPUs, load = 1-minute load average before the run (median); "
             + ", ".join(f"{k} {v}" for k, v in versions.items()))
    text = f"{title}\n\n{table(records, implementations, args.tasks)}\n"
    if missing:
        text += f"\nNot installed (left out): {', '.join(missing)}; `pip install -e .[bench]` adds them.\n"
    if args.skip:
        text += f"\nNot run (--skip): {args.skip}.\n"
    if kept:
        dates = sorted(r["date"][:10] for r in runs if r["method"] in kept and "date" in r)
        text += (f"\nRerun here: {', '.join(methods)}; kept from the earlier run of the records file"
                 f"{' (' + dates[0] + ')' if dates else ''}: {', '.join(kept)}.\n")
    print(text)
    if args.output:
        command = "OMP_NUM_THREADS=1 python benchmarks/peer_merge.py" + (f" --skip {args.skip}" if args.skip else "") \
            + (f" --implementations {args.implementations}" if args.implementations != ",".join(IMPLEMENTATIONS) else "") \
            + (f" --methods {args.methods} --update" if args.update else "") \
            + (f" --records {args.records}" if args.records else "") + f" --output {args.output}"
        args.output.write_text(f"`{command}`\n\n{text}")
    if args.records:
        args.records.write_text(json.dumps({"versions": versions, "summary": records, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
