"""Throughput and size of the storage codecs on one ViT-B/32-sized MLP weight.

For a 768 x 3072 (2,359,296-element) tensor of heavy-tailed (Student-t) values and
a magnitude mask (P-Spar) of sparsity alpha, times encoding (compress the dense
task vector, then serialise to an artifact) and decoding (parse the artifact, then
rebuild the dense float32 tensor), and reports the measured bits per element next
to the closed forms (Eq. 16 for SASS, (b + 1) for Indep, 1 + (1 - alpha) for
T-Switch) and the entropy bound H(1 - alpha) + (1 - alpha) b of an i.i.d. mask plus
b-bit values (*vs entropy*: measured / bound).

    OMP_NUM_THREADS=1 python benchmarks/codec_throughput.py [--clock cpu|wall] [--output codecs.md]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate

from mergebench import codecs as C
from mergebench.sparsify import magnitude_mask

CONFIGS = [  # (label, format, bits, quant)
    ("tswitch", "tswitch", 1, "sign"),
    ("indep b=1 (sign)", "indep", 1, "sign"),
    ("indep b=4", "indep", 4, "bas"),
    ("sass b=1 (sign)", "sass", 1, "sign"),
    ("sass b=4", "sass", 4, "bas"),
]


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def _timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    return out, statistics.median(times)


def run(rows: int, cols: int, alphas: list[float], repeat: int, seed: int, df: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    tau = (1e-3 * rng.standard_t(df, size=(rows, cols))).astype(np.float32)
    n = tau.size
    mb = tau.nbytes / 1e6
    results = []
    for alpha in alphas:
        mask = magnitude_mask(tau, alpha)
        for label, fmt, bits, quant in CONFIGS:
            def encode():
                if quant == "sign":
                    ct = C.tswitch_from_task_vector(tau, mask, fmt=fmt)
                else:
                    ct = C.quantized_from_task_vector(tau, mask, bits, fmt=fmt)
                return ct, C.encode_tensors({"w": ct})

            (ct, blob), t_enc = _timed(encode, repeat)
            dense, t_dec = _timed(lambda: C.decode_tensors(blob)["w"].to_dense(), repeat)
            if not np.array_equal(dense.numpy(), ct.to_numpy()):
                raise AssertionError(f"{label} alpha={alpha}: round trip is not exact")
            _, nbits = C.encode_payload(ct)
            a = ct.sparsity
            if fmt == "sass":
                formula = C.sass_bits_eq16(n, alpha, bits, C.choose_group_size(n, alpha))
            elif fmt == "indep":
                formula = C.indep_bits(n, bits)
            else:
                formula = C.tswitch_bits(n, round(n * (1 - alpha)))
            results.append({
                "format": label, "alpha": alpha, "c": ct.group_size or "-",
                "encode ms": t_enc * 1e3, "decode ms": t_dec * 1e3,
                "encode MB/s": mb / t_enc, "decode MB/s": mb / t_dec,
                "bits/elem": nbits / n, "formula bits/elem": formula / n,
                "entropy bits/elem": C.entropy_bound_bits(n, a, bits) / n,
                "vs entropy": nbits / C.entropy_bound_bits(n, a, bits),
                "artifact bytes": len(blob), "ratio vs fp32": tau.nbytes / len(blob),
            })
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.99])
    ap.add_argument("--repeat", type=int, default=5, help="timing repetitions (the median is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--df", type=float, default=3.0, help="Student-t degrees of freedom")
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                    help="cpu: process time (one thread: the wall time of an idle machine, robust to other jobs); wall")
    ap.add_argument("--output", type=Path, help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    res = run(args.rows, args.cols, args.alphas, args.repeat, args.seed, args.df)
    title = (f"Codec throughput: {args.rows}x{args.cols} fp32 Student-t(df={args.df}) tensor, "
             f"magnitude mask, median of {args.repeat} ({args.clock} time); formula = Eq. 16 (sass), (b+1) (indep), "
             f"1 + (1 - alpha) (tswitch)")
    print(title)
    print(tabulate(res, headers="keys", floatfmt=".3f", tablefmt="github"))
    if args.output:
        args.output.write_text(f"{title}\n\n{tabulate(res, headers='keys', floatfmt='.3f', tablefmt='github')}\n")


if __name__ == "__main__":
    main()
