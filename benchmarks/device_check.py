"""Does evaluation on a GPU give the CPU's answers? Each method is merged once (on the CPU,
as every run does), then evaluated on the CPU in fp32 and on CUDA in fp32 and bf16.

Checks: fp32 on CUDA predicts the CPU's class for >= 99.9 % of the test examples; bf16's
metric is within 0.5 points of the CPU's per task, or within two examples where a test
split is so small (tiny-bert: 96 examples) that one example is worth more. Prints
examples/s per device and precision. Without a GPU it says so and exits 0 after the CPU pass.

    python benchmarks/device_check.py [--backbone tiny-bert --backbone minilm-l6] [--method NAME ...]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tabulate import tabulate

from mergebench.device import autocast, describe_device, resolve_device, to_cpu_float, to_device
from mergebench.runner import exemplars_for, load_pool, resolve, seed_everything, timed_merge

METHODS = ("pretrained", "task-arithmetic", "t-switch")
FP32_AGREEMENT = 0.999
BF16_POINTS = 0.5


def predictions(merged, task, batch_size: int, device: torch.device, precision: str) -> tuple[list, list, float]:
    """Outputs and targets of the test split evaluated on ``device``, and the seconds it took."""
    merged.to(device)
    outputs, targets = [], []
    start = time.perf_counter()
    with torch.no_grad(), autocast(device, precision):
        for inputs, batch_targets in task.batches("test", batch_size):
            outputs.append(to_cpu_float(merged.predict(task.name, to_device(inputs, device))))
            targets.append(batch_targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return outputs, targets, time.perf_counter() - start


def check(backbone_name: str, method_name: str, batch_size: int, devices: list[tuple[torch.device, str]]) -> tuple[list, bool]:
    """Rows (method, task, device, precision, metric, agreement, examples/s) and whether all checks passed."""
    plan = resolve(method_name, backbone_name, batch_size=batch_size)
    backbone = plan.make_backbone()
    rows, passed = [], True
    with load_pool(backbone, [task.name for task in backbone.tasks]) as pool:
        seed_everything(plan.seed)
        merged, _ = timed_merge(plan.method, pool, exemplars_for(plan.method, backbone, pool.tasks, plan.seed))
        for task in backbone.tasks:
            reference = None
            for device, precision in devices:
                outputs, targets, seconds = predictions(merged, task, batch_size, device, precision)
                metric = task.score(outputs, targets)
                examples = sum(len(t) for t in targets)
                classes = torch.cat([o.argmax(-1) for o in outputs]) if outputs[0].dim() > 1 else None
                agreement, ok = "", True
                if reference is None:
                    reference = (metric, classes)
                elif precision == "fp32" and classes is not None:
                    share = float((classes == reference[1]).float().mean())
                    agreement, ok = f"{100 * share:.2f} %", share >= FP32_AGREEMENT
                else:
                    points = 100 * abs(metric - reference[0])
                    ok = points <= max(BF16_POINTS, 100 * 2 / examples)
                    agreement = f"{points:.2f} points"
                passed &= ok
                rows.append([method_name, task.name, describe_device(device), precision, f"{100 * metric:.2f}",
                             agreement + ("" if ok else "  FAILED"), f"{examples / seconds:.0f}"])
    return rows, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", help="default: tiny-bert")
    parser.add_argument("--method", action="append", help=f"default: {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    devices = [(torch.device("cpu"), "fp32")]
    if torch.cuda.is_available():
        cuda = resolve_device("cuda")
        devices += [(cuda, "fp32"), (cuda, "bf16")]
    rows, passed = [], True
    for backbone in args.backbone or ["tiny-bert"]:
        for method in args.method or METHODS:
            found, ok = check(backbone, method, args.batch_size, devices)
            rows += found
            passed &= ok
    print(tabulate(rows, headers=["method", "task", "device", "precision", "metric (%)", "vs CPU fp32", "examples/s"],
                   tablefmt="github"))
    if len(devices) == 1:
        print("no CUDA device on this machine: the CPU pass ran, nothing to compare it with")
        return 0
    print("all checks passed" if passed else "some checks FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
