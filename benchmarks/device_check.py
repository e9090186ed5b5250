"""Does a GPU give the CPU's answers? Each method is merged and evaluated on the CPU in
fp32 (the reference) and on every other ``--devices`` entry in fp32 and bf16. Methods
whose merge runs forward/backward passes (Fisher, RegMean, AdaMerging: they take
exemplars) merge again on each device under its precision, as a run with ``--device``
does; the others merge once on the CPU. Evaluation reads its batches through the
DataLoader (``--num-workers``; default: none on the CPU, up to 4 beside a GPU, pinned).

Checks: fp32 on the device predicts the CPU's class for >= 99.9 % of the test examples; bf16's
metric is within 0.5 points of the CPU's per task, or within two examples where a test
split is so small (tiny-bert: 96 examples) that one example is worth more. Prints merge
seconds and evaluation examples/s per device and precision. A device this machine lacks
fails at once, naming what it has; ``--devices cpu`` is a smoke check of the CPU pass alone.

    python benchmarks/device_check.py [--devices cpu,cuda] [--backbone tiny-bert --backbone minilm-l6] [--method NAME ...]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tabulate import tabulate

from mergebench.device import autocast, check_precision, describe_device, resolve_device, to_cpu_float, to_device
from mergebench.errors import MergebenchError
from mergebench.evaluate import evaluation_batches
from mergebench.runner import exemplars_for, load_pool, resolve, seed_everything, timed_merge

METHODS = ("pretrained", "task-arithmetic", "t-switch", "fisher", "regmean", "adamerging")
# shorter than the papers' defaults, so the whole check stays a few minutes on a GPU
HYPERPARAMETERS = {"fisher": {"exemplars": 64}, "regmean": {"exemplars": 64},
                   "adamerging": {"exemplars": 64, "steps": 20}}
FP32_AGREEMENT = 0.999
BF16_POINTS = 0.5


def predictions(merged, task, batch_size: int, device: torch.device, precision: str,
                workers: int | None) -> tuple[list, list, float]:
    """Outputs and targets of the test split evaluated on ``device``, and the seconds it took."""
    merged.to(device)
    outputs, targets = [], []
    start = time.perf_counter()
    with torch.no_grad(), autocast(device, precision):
        for inputs, batch_targets in evaluation_batches(merged, task, batch_size, workers):
            outputs.append(to_cpu_float(merged.predict(task.name, to_device(inputs, device))))
            targets.append(batch_targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return outputs, targets, time.perf_counter() - start


def check(backbone_name: str, method_name: str, batch_size: int, devices: list[tuple[torch.device, str]],
          workers: int | None = None) -> tuple[list, bool]:
    """Rows (method, task, device, precision, metric, agreement, merge s, examples/s) and whether all checks passed."""
    plan = resolve(method_name, backbone_name, batch_size=batch_size, hyperparameters=HYPERPARAMETERS.get(method_name))
    method = plan.method
    backbone = plan.make_backbone()
    accelerators = [device for device, _ in devices if device.type != "cpu"]
    if accelerators:
        backbone.prepare_device = accelerators[0]  # a suite fine-tuned locally prepares there if it must
    rows, passed = [], True
    with load_pool(backbone, [task.name for task in backbone.tasks]) as pool:
        exemplars = exemplars_for(method, backbone, pool.tasks, plan.seed)
        merges = {}
        for device, precision in devices:
            where = (device, precision) if method.needs_exemplars else (torch.device("cpu"), "fp32")
            if where not in merges:
                method.device, method.precision = where
                seed_everything(plan.seed)
                merges[where] = timed_merge(method, pool, exemplars)
        references = {}
        for device, precision in devices:
            where = (device, precision) if method.needs_exemplars else (torch.device("cpu"), "fp32")
            merged, merge_seconds = merges[where]
            for task in backbone.tasks:
                outputs, targets, seconds = predictions(merged, task, batch_size, device, precision, workers)
                metric = task.score(outputs, targets)
                examples = sum(len(t) for t in targets)
                classes = torch.cat([o.argmax(-1) for o in outputs]) if outputs[0].dim() > 1 else None
                agreement, ok = "", True
                if task.name not in references:
                    references[task.name] = (metric, classes)
                elif precision == "fp32" and classes is not None:
                    share = float((classes == references[task.name][1]).float().mean())
                    agreement, ok = f"{100 * share:.2f} %", share >= FP32_AGREEMENT
                else:
                    points = 100 * abs(metric - references[task.name][0])
                    ok = points <= max(BF16_POINTS, 100 * 2 / examples)
                    agreement = f"{points:.2f} points"
                passed &= ok
                rows.append([method_name, task.name, describe_device(device), precision, f"{100 * metric:.2f}",
                             agreement + ("" if ok else "  FAILED"), f"{merge_seconds:.1f}",
                             f"{examples / seconds:.0f}"])
            merged.to("cpu")
    return rows, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated; the CPU (fp32) is always the reference (default: cpu,cuda)")
    parser.add_argument("--backbone", action="append", help="default: tiny-bert")
    parser.add_argument("--method", action="append", help=f"default: {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader processes (default: per device)")
    args = parser.parse_args(argv)
    devices = [(torch.device("cpu"), "fp32")]
    try:
        for name in args.devices.split(","):
            device = resolve_device(name.strip())
            if device.type != "cpu":
                devices += [(device, "fp32")]
                if check_precision_ok(device, "bf16"):
                    devices.append((device, "bf16"))
    except MergebenchError as error:
        print(f"device_check: {error}", file=sys.stderr)
        return 2
    rows, passed = [], True
    for backbone in args.backbone or ["tiny-bert"]:
        for method in args.method or METHODS:
            found, ok = check(backbone, method, args.batch_size, devices, args.num_workers)
            rows += found
            passed &= ok
    print(tabulate(rows, headers=["method", "task", "device", "precision", "metric (%)", "vs CPU fp32", "merge (s)",
                                  "examples/s"], tablefmt="github"))
    if len(devices) == 1:
        print("only the CPU was asked for (--devices cpu): its pass ran, nothing to compare it with")
        return 0
    print("all checks passed" if passed else "some checks FAILED")
    return 0 if passed else 1


def check_precision_ok(device: torch.device, precision: str) -> bool:
    try:
        check_precision(precision, device)
    except MergebenchError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
