"""SASS storage against the sparsity ratio on real task vectors (Auto-FlexSwitch,
arXiv 2604.28109, Sec. III-C4 and IV, Figs. 7 and 12): each task's task vector is
pruned by P-Spar at alpha, its kept values coded with b bits (b = 1: the T-Switch
sign, as the paper's Fig. 12 measures Auto-Switch; b > 1: BAS codes, Eq. 13), and
written as a real SASS artifact (``mergebench.codecs``). The file size is set
beside Eq. 16 (evaluated at the nominal alpha with the group size of Eq. 17,
summed over tensors), Indep ((b + 1) n), the T-Switch layout (n + K) and fp32.
The same switches are also written in the entropy-coded ``ans`` format and set
beside the empirical entropy bounds of mask + values under each model
(``codecs.entropy_bounds``: i.i.d., per-row and per-column keep rates, neighbour
context), which says how much structure beyond i.i.d. the masks have.
No model is evaluated, so this analysis takes seconds.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from mergebench.analysis.options import AnalysisOptions
from mergebench.analysis.report import Report, markdown_table
from mergebench.codecs import (choose_group_size, encode_payload, encode_tensors, entropy_bound_bits, entropy_bounds, indep_bits,
                               quantized_from_task_vector, sass_bits_eq16, tswitch_bits, tswitch_from_task_vector)
from mergebench.pool import ModelPool
from mergebench.sparsify import pulse_mask

SASS_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # Fig. 12's range
MB = 1_000_000


def measure(pool: ModelPool, task: str, alphas, bits_list) -> dict:
    """Sizes in bytes of one task vector at every (bits, alpha), from real artifacts."""
    taus = {key: tau for key in pool.merged_keys if torch.any(tau := pool.task_vector(task, key))}
    n = sum(tau.numel() for tau in taus.values())
    out = {"elements": n, "largest": max(t.numel() for t in taus.values()), "fp32": 4 * n, "rows": []}
    for alpha in alphas:
        masks = {key: pulse_mask(tau, alpha) for key, tau in taus.items()}
        kept = sum(int(mask.sum()) for mask in masks.values())
        for bits in bits_list:
            tensors = {key: (tswitch_from_task_vector(tau, masks[key], fmt="sass") if bits == 1
                             else quantized_from_task_vector(tau, masks[key], bits, fmt="sass"))
                       for key, tau in taus.items()}
            artifact = encode_tensors(tensors)
            payloads = [encode_payload(ct) for ct in tensors.values()]  # (bytes, measured bit length)
            ans = {key: (tswitch_from_task_vector(tau, masks[key], fmt="ans") if bits == 1
                         else quantized_from_task_vector(tau, masks[key], bits, fmt="ans"))
                   for key, tau in taus.items()}
            bounds: dict[str, float] = {}
            for ct in ans.values():
                for model, value in entropy_bounds(ct.mask, ct.codes, ct.shape, bits).items():
                    bounds[model] = bounds.get(model, 0.0) + value
            ans_file = len(encode_tensors(ans))
            out["rows"].append({
                "ans_file": ans_file,
                "ans_payload_bits": sum(ct.payload_bits for ct in ans.values()),
                **{f"bound_{model}_bits": value for model, value in bounds.items()},
                "alpha": alpha, "bits": bits, "kept": kept,
                "file": len(artifact),
                "payload": sum(len(data) for data, _ in payloads),
                "stream_bits": sum(nbits for _, nbits in payloads),
                "eq16_bits": sum(sass_bits_eq16(t.numel(), alpha, bits, choose_group_size(t.numel(), alpha))
                                 for t in taus.values()),
                "eq16_actual_bits": sum(sass_bits_eq16(ct.n, ct.sparsity, bits, ct.group_size) for ct in tensors.values()),
                "indep_bits": sum(indep_bits(t.numel(), bits) for t in taus.values()),
                "entropy_bits": sum(entropy_bound_bits(t.numel(), alpha, bits) for t in taus.values()),
                "tswitch_bits": sum(tswitch_bits(t.numel(), int(masks[k].sum())) for k, t in taus.items()),
            })
    return out


def run(backbone, options: AnalysisOptions) -> list:
    alphas = tuple(options.alphas or SASS_ALPHAS)
    bits_list = tuple(options.bits)
    tasks = [task.name for task in backbone.tasks]
    with ModelPool(backbone, tasks) as pool:
        measured = {task: measure(pool, task, alphas, bits_list) for task in tqdm(tasks, desc="sass", unit="task")}

    def mean(field, alpha, bits):
        return float(np.mean([next(r[field] for r in measured[t]["rows"] if r["alpha"] == alpha and r["bits"] == bits)
                              for t in tasks]))

    fp32 = float(np.mean([measured[t]["fp32"] for t in tasks]))
    elements = float(np.mean([measured[t]["elements"] for t in tasks]))
    largest = measured[tasks[0]]["largest"]
    rows = []
    for bits in bits_list:
        for alpha in alphas:
            file, eq16 = mean("file", alpha, bits), mean("eq16_bits", alpha, bits) / 8
            rows.append([bits, f"{alpha:g}", choose_group_size(largest, alpha), f"{file / MB:.3f}",
                         f"{(file - mean('payload', alpha, bits)) / 1e3:.1f}",
                         f"{eq16 / MB:.3f}", f"{100 * (file / eq16 - 1):+.2f}%",
                         f"{mean('stream_bits', alpha, bits) / mean('eq16_actual_bits', alpha, bits):.6f}",
                         f"{mean('entropy_bits', alpha, bits) / 8 / MB:.3f}",
                         f"{mean('indep_bits', alpha, bits) / 8 / MB:.3f}",
                         f"{mean('tswitch_bits', alpha, bits) / 8 / MB:.3f}" if bits == 1 else "-",
                         f"{fp32 / file:.1f}x", f"{8 * file / elements:.3f}"])
    report = Report("sass", f"SASS storage on the real task vectors of {backbone.name} ({backbone.suite} suite)",
                    options.command)
    report.intro = (
        f"Per task vector (mean over the {len(tasks)} tasks; {elements / 1e6:.2f} M changed entries each, fp32 "
        f"{fp32 / MB:.2f} MB): P-Spar at alpha, kept values at b bits (b = 1: T-Switch signs and one knob per tensor; "
        f"b > 1: BAS codes), written as one SASS artifact. *SASS file* is the artifact's size (payloads plus the "
        f"container header with per-tensor parameters and checksums); *Eq. 16* sums the closed form over tensors at the nominal "
        f"alpha with c from Eq. 17 (c shown for the largest tensor, {largest:,} entries); *header* is the file minus its "
        f"payloads; *stream / Eq. 16 (actual)* divides the "
        f"measured bitstream lengths by Eq. 16 at each tensor's actual sparsity; *entropy bound* is "
        f"n (H(1 - alpha) + (1 - alpha) b) per tensor (an i.i.d. mask with b-bit values). Sizes in MB (10^6 bytes)."
    )
    report.add("Storage per task vector", markdown_table(
        ["b", "alpha", "c", "SASS file", "header (kB)", "Eq. 16", "file vs Eq. 16", "stream / Eq. 16 (actual)", "entropy bound", "Indep", "T-Switch",
         "fp32 / file", "bits/entry"], rows))
    findings = []
    for bits in bits_list:
        smaller = [a for a in alphas if mean("file", a, bits) < mean("indep_bits", a, bits) / 8]
        last = alphas[-1]
        findings.append(
            f"- b = {bits}: the SASS file is smaller than Indep at alpha = {', '.join(f'{a:g}' for a in smaller) or 'none'}; "
            f"at alpha = {last:g} it is {mean('file', last, bits) / MB:.3f} MB ({fp32 / mean('file', last, bits):.0f}x less "
            f"than fp32), {100 * (mean('file', last, bits) / (mean('eq16_bits', last, bits) / 8) - 1):+.1f}% from Eq. 16.")
    ans_rows = []
    for bits in bits_list:
        for alpha in alphas:
            iid = mean("bound_mask_iid_bits", alpha, bits) + mean("bound_values_iid_bits", alpha, bits)
            ans_file = mean("ans_file", alpha, bits)
            ans_rows.append([bits, f"{alpha:g}", f"{ans_file / MB:.4f}", f"{(ans_file - mean('ans_payload_bits', alpha, bits) / 8) / 1e3:.2f}",
                             f"{iid / 8 / MB:.4f}", f"{8 * ans_file / iid:.3f}",
                             f"{mean('ans_payload_bits', alpha, bits) / iid:.3f}",
                             *(f"{(mean(f'bound_mask_{m}_bits', alpha, bits) + mean('bound_values_iid_bits', alpha, bits)) / iid:.3f}"
                               for m in ("rows", "columns", "context")),
                             f"{mean('bound_values_rows_bits', alpha, bits) / max(mean('bound_values_iid_bits', alpha, bits), 1e-9):.3f}",
                             f"{mean('bound_values_uniform_bits', alpha, bits) / max(mean('bound_values_iid_bits', alpha, bits), 1e-9):.3f}",
                             f"{mean('file', alpha, bits) / ans_file:.2f}x"])
    report.add("Entropy-coded (ans) against the bounds", (
        "The same switches in the `ans` format (mask and value codes entropy-coded, per-line keep-rate buckets when "
        "cheaper). *i.i.d. bound*: n H(K/n) + K H(codes) per tensor (empirical, its parameters free); *file / bound* "
        "includes the container header, *payload / bound* not; *rows*, *columns*, *context*: the bound of mask + values "
        "with the mask modelled by per-row or per-column keep rates or by its left and upper neighbours, over the i.i.d. "
        "bound (below 1: structure an adaptive model can use; the per-line bounds leave out the per-line rates a file "
        "must store); *values rows*: the per-row code entropy over the i.i.d. one (signs at b = 1; many rows hold few "
        "codes, so this empirical figure is optimistic); *b / H(codes)*: b bits a value over the codes' entropy.\n\n"
        + markdown_table(["b", "alpha", "ans file", "header (kB)", "i.i.d. bound", "file / bound", "payload / bound",
                          "rows", "columns", "context", "values rows", "b / H(codes)", "SASS file / ans file"], ans_rows)))
    report.add("Findings", "\n".join(findings))
    report.raw = {"backbone": backbone.name, "alphas": list(alphas), "bits": list(bits_list), "tasks": measured}

    def draw(plt):
        figure, axes = plt.subplots(1, len(bits_list), figsize=(6 * len(bits_list), 4.2), squeeze=False)
        for ax, bits in zip(axes.flat, bits_list):
            ax.plot(alphas, [mean("eq16_bits", a, bits) / 8 / MB for a in alphas], "-", color="tab:blue", label="SASS, Eq. 16")
            ax.plot(alphas, [mean("file", a, bits) / MB for a in alphas], "o", color="tab:red", label="SASS, measured file")
            ax.axhline(mean("indep_bits", alphas[0], bits) / 8 / MB, ls="--", color="tab:green", label="Indep")
            if bits == 1:
                ax.plot(alphas, [mean("tswitch_bits", a, bits) / 8 / MB for a in alphas], ":", color="tab:purple", label="T-Switch layout")
            ax.axhline(fp32 / MB, ls="-.", color="grey", label="fp32 task vector")
            ax.set_yscale("log")
            ax.set_xlabel("sparsity ratio alpha")
            ax.set_ylabel("MB per task vector")
            ax.set_title(f"b = {bits}", fontsize=10)
            ax.legend(fontsize=7)
        figure.suptitle(f"SASS storage vs alpha: {backbone.name} task vectors (mean over {len(tasks)} tasks)")
        figure.tight_layout()
        return figure

    return report.write(options.output_dir, draw if options.plot else None)
