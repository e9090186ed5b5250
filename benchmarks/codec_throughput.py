"""Throughput and size of the storage codecs on one ViT-B/32-sized MLP weight, and the
container header's share of a whole ViT-B/32 task vector's file.

For a 768 x 3072 (2,359,296-element) tensor of heavy-tailed (Student-t) values and
a magnitude mask (P-Spar) of sparsity alpha, times encoding (compress the dense
task vector, then serialise to an artifact) and decoding (parse the artifact, then
rebuild the dense float32 tensor), and reports the measured bits per element next
to the closed forms (Eq. 16 for SASS, (b + 1) for Indep, 1 + (1 - alpha) for
T-Switch), the entropy bound H(1 - alpha) + (1 - alpha) b of an i.i.d. mask plus
b-bit values (*vs entropy*: measured / bound) and the empirical i.i.d. bound
n H(1 - alpha) + K H(codes) with the codes' own histogram (*vs i.i.d. emp.*), the
least an order-0 coder of mask and values can reach (``codecs.entropy_bounds``).

The second table writes a whole synthetic ViT-B/32 task vector (every tensor of the
CLIP vision tower, i.i.d. Student-t, magnitude mask per tensor) in each format and
reports the container header's bytes and share of the file, for the version-3 binary
header and for the version-2 JSON header the same entries would have had.

The third measures structure beyond i.i.d. on the synthetic ViT-B/32 task vectors
as ``benchmarks/synthetic_vit.py`` makes them (theta + tau - theta in fp32, the
matrices of two encoder layers, P-Spar masks): the entropy bounds of mask + values
per model over the i.i.d. one, next to the ans payload.

    python benchmarks/codec_throughput.py [--clock cpu|wall] [--output codecs.md]
        [--sections throughput,vit-file,vit-structure] [--path auto|numpy]

``--path numpy`` times the numpy code that runs where numba (the ``fast`` extra) is not
installed; the default uses the compiled kernels when numba is there (same bytes).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from mergebench import codecs as C
from mergebench import container as K
from mergebench.sparsify import magnitude_mask

CONFIGS = [  # (label, format, bits, quant)
    ("tswitch", "tswitch", 1, "sign"),
    ("indep b=1 (sign)", "indep", 1, "sign"),
    ("indep b=2", "indep", 2, "bas"),
    ("indep b=4", "indep", 4, "bas"),
    ("indep b=8", "indep", 8, "bas"),
    ("sass b=1 (sign)", "sass", 1, "sign"),
    ("sass b=2", "sass", 2, "bas"),
    ("sass b=4", "sass", 4, "bas"),
    ("sass b=8", "sass", 8, "bas"),
    ("ans b=1 (sign)", "ans", 1, "sign"),
    ("ans b=2", "ans", 2, "bas"),
    ("ans b=4", "ans", 4, "bas"),
    ("ans b=8", "ans", 8, "bas"),
]


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def _timed(fn, repeat: int):
    """Median time of ``repeat`` calls after one untimed call (which loads or compiles the
    numba kernels on first use)."""
    times, out = [], fn()
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
            bounds = C.entropy_bounds(ct.mask, ct.codes, ct.shape, bits)
            iid = bounds["mask_iid"] + bounds["values_iid"]
            if fmt == "sass":
                formula = C.sass_bits_eq16(n, alpha, bits, C.choose_group_size(n, alpha))
            elif fmt == "indep":
                formula = C.indep_bits(n, bits)
            elif fmt == "ans":
                formula = iid
            else:
                formula = C.tswitch_bits(n, round(n * (1 - alpha)))
            results.append({
                "format": label, "alpha": alpha, "c": ct.group_size or "-",
                "encode ms": t_enc * 1e3, "decode ms": t_dec * 1e3,
                "encode MB/s": mb / t_enc, "decode MB/s": mb / t_dec,
                "bits/elem": nbits / n, "formula bits/elem": formula / n,
                "entropy bits/elem": C.entropy_bound_bits(n, a, bits) / n,
                "vs entropy": nbits / C.entropy_bound_bits(n, a, bits),
                "iid emp. bits/elem": iid / n, "vs iid emp.": nbits / iid,
                "artifact bytes": len(blob), "ratio vs fp32": tau.nbytes / len(blob),
            })
    return results


def vit_file(alpha: float, seed: int, df: float) -> list[dict]:
    """Header bytes of a whole ViT-B/32 task vector's file in each format (version 3, and the
    version-2 JSON header of the same entries)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIPVisionModel(CLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=32)).state_dict().items()}
    rows = []
    for label, fmt, bits, quant in [c for c in CONFIGS if c[1] in ("tswitch", "sass", "ans")]:
        rng = np.random.default_rng(seed)
        tensors = {}
        for name, shape in shapes.items():
            tau = (1e-3 * rng.standard_t(df, size=shape)).astype(np.float32)
            mask = magnitude_mask(tau, alpha)
            tensors[name] = (C.tswitch_from_task_vector(tau, mask, fmt=fmt) if quant == "sign"
                             else C.quantized_from_task_vector(tau, mask, bits, fmt=fmt))
        blob = K.encode_tensors(tensors, {"content": "t-switch/switches"})
        header = K.parse_header(blob)
        for e in header["tensors"]:  # what version 2 also stated per codec entry
            ct = tensors[e["name"]]
            e.update(sparsity=ct.sparsity, n_kept=ct.n_kept, group_size=ct.group_size)
        v3 = len(blob) - header["payload_bytes"]  # preamble + header table
        v2 = len(K.pack_container(header, [], 2))
        payload = header["payload_bytes"]
        rows.append({"format": label, "alpha": alpha, "tensors": len(tensors), "payload bytes": payload,
                     "v3 header bytes": v3, "v3 header share %": 100 * v3 / (payload + v3),
                     "v2 JSON header bytes": v2, "v2 header share %": 100 * v2 / (payload + v2)})
    return rows


def vit_structure(seed: int) -> list[dict]:
    """Entropy bounds per model and the ans payload on synthetic ViT-B/32 task vectors."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_vit import PooledVision

    from mergebench.sparsify import pulse_mask

    torch.manual_seed(seed)
    state = PooledVision().state_dict()
    rng = np.random.default_rng(seed + 1)
    taus = {}
    for key in (k for k in state if state[k].dim() == 2 and (".layers.0." in k or ".layers.6." in k)):
        theta = state[key]  # as SyntheticViTB32.prepare writes a fine-tuned tensor, minus theta again
        t = rng.standard_t(3, size=theta.shape).astype(np.float32) / np.sqrt(3.0)
        taus[key] = (theta + torch.from_numpy(t) * (1e-3 * float(theta.pow(2).mean().sqrt()))) - theta
    rows = []
    for alpha in (0.5, 0.9, 0.99):
        for bits in (1, 4):
            total: dict[str, float] = {}
            payload = 0
            for tau in taus.values():
                mask = pulse_mask(tau, alpha)
                ct = (C.tswitch_from_task_vector(tau, mask, fmt="ans") if bits == 1
                      else C.quantized_from_task_vector(tau, mask, bits, fmt="ans"))
                payload += ct.payload_bits
                for model, value in C.entropy_bounds(ct.mask, ct.codes, ct.shape, bits).items():
                    total[model] = total.get(model, 0.0) + value
            iid = total["mask_iid"] + total["values_iid"]
            rows.append({"alpha": alpha, "b": bits, "tensors": len(taus), "entries": sum(t.numel() for t in taus.values()),
                         "iid bound bits/elem": iid / sum(t.numel() for t in taus.values()),
                         "ans / iid": payload / iid,
                         **{f"{m} / iid": (total[f"mask_{m}"] + total["values_iid"]) / iid
                            for m in ("rows", "columns", "context")},
                         "values rows / values iid": total["values_rows"] / max(total["values_iid"], 1e-9)})
    return rows


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
    ap.add_argument("--vit-alpha", type=float, default=0.99, help="sparsity of the whole ViT-B/32 file")
    ap.add_argument("--path", choices=["auto", "numpy"], default="auto",
                    help="auto: the numba kernels when numba is installed; numpy: the numpy code without them")
    ap.add_argument("--sections", default="throughput,vit-file,vit-structure",
                    help="comma-separated: throughput (the codec table), vit-file (header share of a whole "
                         "ViT-B/32 file), vit-structure (entropy bounds per model on synthetic ViT-B/32 task vectors)")
    args = ap.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.path == "numpy":
        C._FAST = False
    kern = C._kernels()
    if kern is not None:
        import numba

        path = f"numba {numba.__version__} kernels"
    else:
        path = "numpy path"
    torch.set_num_threads(1)
    sections = set(args.sections.split(","))
    unknown = sections - {"throughput", "vit-file", "vit-structure"}
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    title = (f"Codec throughput: {args.rows}x{args.cols} fp32 Student-t(df={args.df}) tensor, "
             f"magnitude mask, {path}, median of {args.repeat} ({args.clock} time, one thread); formula = Eq. 16 (sass), "
             f"(b+1) (indep), 1 + (1 - alpha) (tswitch), the empirical i.i.d. bound (ans)")
    text = ""
    if "throughput" in sections:
        res = run(args.rows, args.cols, args.alphas, args.repeat, args.seed, args.df)
        text += f"{title}\n\n{tabulate(res, headers='keys', floatfmt='.3f', tablefmt='github')}\n"
    if "vit-file" in sections:
        vit = vit_file(args.vit_alpha, args.seed, args.df)
        text += (f"\nContainer header of a whole synthetic ViT-B/32 task vector at alpha = {args.vit_alpha}\n\n"
                 f"{tabulate(vit, headers='keys', floatfmt='.3f', tablefmt='github')}\n")
    if "vit-structure" in sections:
        text += ("\nStructure beyond i.i.d. on synthetic ViT-B/32 task vectors (bounds over the i.i.d. bound)\n\n"
                 f"{tabulate(vit_structure(args.seed), headers='keys', floatfmt='.4f', tablefmt='github')}\n")
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
