"""FlexSwitch and Auto-FlexSwitch (Qi et al., "Auto-FlexSwitch", arXiv 2604.28109, 2026,
§III-C, Eqs. 6-19; the equations are the specification).

FlexSwitch learns, per task k and per parameter tensor l with a task vector tau:
* LGS (Eqs. 6-7): thresholds t+ = v+_min + phi(s+) r+, t- likewise, phi(x) = arctan(x)/pi + 0.5;
  a soft gate M = sigmoid((tau - t+)/(rho r+)) + sigmoid((-t- - tau)/(rho r-)) and a scale
  softplus(kappa);
* BAS (Eqs. 12-13): a softmax(w/omega) mixture of the Eq. 13 quantiser at the bit-widths
  W = {1, 2, 4, 8};
* the joint objective (Eq. 14): mean gate value + mean mixed bit-width / max(W) +
  lambda * performance-preservation loss between the fine-tuned model and the pretrained
  model plus softplus(kappa) M (.) Q_M(tau), on batches of the task's exemplars. The loss is
  KL at T = 4 (Eq. 9), MSE of the outputs (Eq. 10) or linear CKA of the output matrices
  (Eq. 11), the outputs being the task head's logits.
After training: hard mask M > 0.5, bit-width argmax w (Eq. 15), tau~ = softplus(kappa)
M_hard (.) Q(tau; b), stored per tensor in the SASS grouped-COO format with the group size of
Eq. 17 (``mergebench.codecs``); storage is the size of those files. ``format`` stores the same
mask and codes in another layout that holds b-bit values ("ans": entropy-coded, "indep"), which
changes the bytes and no value.

Auto-FlexSwitch routes per input (§III-C5): K-means (E centres) over each task's query set of
pretrained features, a low-rank projection L (r x e) trained on Eq. 19, and k-NN over the
projected centres: w_k(x) = |N_x ∩ A_k| / C, composed as theta + sum_k w_k(x) tau~_k through
the dynamic inference engine. ``routing`` "per-batch" gives every input of a batch the batch
mean of the weights instead (the T-Switch authors' released code; not automatic in deployment:
``mergebench.dynamic.RoutedMerged``).
On a detector (rf100, §IV-A2) the preservation loss is MSE, and routing uses one vector per
object query, each image composed by the majority vote of its queries (``KNNRouter``).

Defaults are the paper's (§III-C, §IV): N = 100 exemplars, batch 32, 500 Adam steps, lr 0.05
(LGS: s+, s-, kappa) and 0.1 (BAS: w), rho = omega = 1.0 decayed x0.9 every 10 steps;
r = 32, E = 20 (its ablation's fixed value), metric lr 0.5 for 100 epochs. Choices the paper
leaves open, documented here:
* lambda: Table I is not in our copy of the paper; the defaults (KL 1.0, MSE 1.0, CKA 10.0)
  were chosen on the mini suite so that each loss reaches a comparable sparsity (the
  paper's stated criterion); see README.
* initial values: s = 0 (thresholds at mid-range), softplus(kappa) = 1, w = 0 (uniform mix).
* a side with no entries (e.g. no negative entries) has no gate term; a side whose entries
  are all equal uses r = v_max so the gate stays finite.
* L starts as a random orthonormal projection (seeded); Eq. 19 with an empty own-task
  neighbourhood is clamped at 1e-12 inside the log; C = 10 neighbours as in Auto-Switch.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mergebench.cache import cache_dir
from mergebench.codecs import CompressedTensor, dequantize, quantize, quantized_from_task_vector
from mergebench.container import decode_tensors, encode_tensors, read_artifact, write_artifact
from mergebench.dynamic import ROUTING_MODES, ComposedMerged, KNNRouter
from mergebench.device import autocast, to_device
from mergebench.errors import CorruptArtifactError, HyperparameterError
from mergebench.exemplars import batched_features, per_task_features, task_indices
from mergebench.hyperparameters import Bool, Choice, Float, Int, IntList
from mergebench.method import Method, load_encoder
from mergebench.pool import ModelPool
from mergebench.registry import register_method
from mergebench.suite import declared_tasks
from mergebench.switches import SwitchStore
from mergebench.task import OUTPUT_PER_INPUT, routing_view

LOSSES = ("kl", "mse", "cka")
# the codec layouts that hold b-bit BAS codes (the tswitch layout holds signs only); sass first,
# the paper's storage (§III-D)
SWITCH_FORMATS = ("sass", "ans", "indep")
DEFAULT_LAMBDA = {"kl": 1.0, "mse": 1.0, "cka": 10.0}


def phi(x: torch.Tensor) -> torch.Tensor:
    """The threshold mapping of Eq. 6: arctan(x)/pi + 0.5, from R onto (0, 1)."""
    return torch.atan(x) / math.pi + 0.5


# --------------------------------------------------------------------------- losses


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Eq. 9: T^2 / B sum_i KL(q_i || p_i), q from the fine-tuned model, p from the gated one."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 10: 1/B sum_i ||f(x_i; Theta_k) - f(x_i; Theta + tau^)||_2^2, over all of an input's
    outputs (a detector's: every object query's class logits and box)."""
    return (teacher - student).pow(2).flatten(1).sum(1).mean()


def cka_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 11: 1 - ||F^T H F^||_F^2 / (||F^T H F||_F ||F^^T H F^||_F), H the centring matrix."""
    f = teacher - teacher.mean(0, keepdim=True)  # H F (H is idempotent, so F^T H G = (HF)^T (HG))
    g = student - student.mean(0, keepdim=True)
    cross = (f.T @ g).pow(2).sum()
    return 1.0 - cross / ((f.T @ f).norm() * (g.T @ g).norm()).clamp_min(1e-12)


PRESERVATION_LOSSES = {"kl": kl_loss, "mse": mse_loss, "cka": cka_loss}


def resolve_loss(method: Method, backbone) -> str:
    """The preservation loss a merge on ``backbone`` uses. KL and CKA read one output vector
    per input; on tasks without one (a detector's classes and boxes per object query) it is
    MSE, the paper's choice for DETR (§IV-A2: "we only consider MSE as the performance
    preserving loss to ensure alignment of both the classification and regression
    branches"). The default becomes mse there; asking for another is an error."""
    if all(OUTPUT_PER_INPUT in task.capabilities for task in declared_tasks(backbone)):
        return str(method.hparams["loss"])
    if "loss" in method.overrides and method.hparams["loss"] != "mse":
        raise HyperparameterError(f"{method.name}: loss {method.hparams['loss']!r} reads one output vector per input, "
                                  f"which the tasks of {backbone.name} do not have; use loss=mse, the paper's choice "
                                  "for DETR")
    return "mse"


# --------------------------------------------------------------------------- gates


@dataclass
class SignRange:
    """[v_min, v_max] of the magnitudes of one sign's entries and r_max = v_max - v_min (Eq. 6)."""

    present: bool
    v_min: float
    v_max: float

    @property
    def r(self) -> float:
        width = self.v_max - self.v_min
        return width if width > 0 else max(self.v_max, 1e-12)

    @staticmethod
    def of(magnitudes: torch.Tensor) -> "SignRange":
        if magnitudes.numel() == 0:
            return SignRange(False, 0.0, 0.0)
        return SignRange(True, float(magnitudes.min()), float(magnitudes.max()))


class GatedTaskVector(torch.autograd.Function):
    """delta = scale * M (.) sum_b p_b Q_b and sum(M), M = sigmoid((tau - t+) inv+) +
    sigmoid((-t- - tau) inv-) (Eqs. 7 and 12), with a hand-written backward to the scalars
    t+, t-, scale and the mixing weights p only: autograd's graph of the same expression keeps
    about twice as many full-size temporaries, and this runs once per tensor per step.
    inv = 0 marks a sign without entries (its sigmoid term is left out)."""

    @staticmethod
    def forward(ctx, t_pos, t_neg, scale, probs, tau, levels, inv_pos: float, inv_neg: float):
        # in-place chains: each full-size temporary is allocated once (fresh pages are what costs)
        up = torch.sub(tau, t_pos).mul_(inv_pos).sigmoid_() if inv_pos else None
        down = torch.neg(tau).sub_(t_neg).mul_(inv_neg).sigmoid_() if inv_neg else None
        gate = up + down if up is not None and down is not None else (up if up is not None else down).clone()
        mixed = torch.tensordot(probs, levels, dims=1)
        ctx.save_for_backward(scale, probs, levels, gate, mixed, up, down)
        ctx.inv = (inv_pos, inv_neg)
        return torch.mul(gate, mixed).mul_(scale), gate.sum()

    @staticmethod
    def backward(ctx, grad_delta, grad_mass):
        scale, probs, levels, gate, mixed, up, down = ctx.saved_tensors
        inv_pos, inv_neg = ctx.inv
        grad_gate = torch.mul(grad_delta, mixed).mul_(scale).add_(grad_mass).view(-1)

        def threshold_grad(side, inv):  # d/dt of sigmoid(+-(tau - t) inv) summed against grad_gate
            if side is None:
                return torch.zeros((), device=grad_delta.device)
            slope = torch.mul(side, side).neg_().add_(side)  # sigmoid' = s (1 - s)
            return -inv * torch.dot(grad_gate, slope.view(-1))

        grad_t_pos, grad_t_neg = threshold_grad(up, inv_pos), threshold_grad(down, inv_neg)
        gated = torch.mul(grad_delta, gate).view(-1)
        grad_scale = torch.dot(gated, mixed.view(-1))
        grad_probs = scale * (levels.reshape(len(probs), -1) @ gated)
        return grad_t_pos, grad_t_neg, grad_scale, grad_probs, None, None, None, None


class TensorGate(nn.Module):
    """The learnable switch of one tensor's task vector: s+, s-, kappa (LGS) and w (BAS)."""

    def __init__(self, tau: torch.Tensor, bit_widths: tuple[int, ...]):
        super().__init__()
        self.register_buffer("tau", tau.float(), persistent=False)
        self.pos = SignRange.of(tau[tau > 0])
        self.neg = SignRange.of(-tau[tau < 0])
        self.bounds = (self.neg.v_max, self.pos.v_max)  # the Eq. 13 range [-v_max^-, v_max^+]
        self.s_pos = nn.Parameter(torch.zeros(()))
        self.s_neg = nn.Parameter(torch.zeros(()))
        self.kappa = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus(kappa) = 1
        self.w = nn.Parameter(torch.zeros(len(bit_widths)))
        self.bit_widths = bit_widths
        # Q(tau; b) for every b in W, computed by the codec's quantiser so that what is
        # trained is exactly what is stored
        levels = [torch.from_numpy(dequantize(*quantize(tau.flatten(), b, bounds=self.bounds))).view_as(tau)
                  for b in bit_widths]
        self.register_buffer("levels", torch.stack(levels), persistent=False)

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """t+ and t- of Eq. 6."""
        return self.pos.v_min + phi(self.s_pos) * self.pos.r, self.neg.v_min + phi(self.s_neg) * self.neg.r

    def gate(self, rho: float) -> torch.Tensor:
        """M of Eq. 7 (without the scale)."""
        t_pos, t_neg = self.thresholds()
        gate = torch.zeros_like(self.tau)
        if self.pos.present:
            gate = gate + torch.sigmoid((self.tau - t_pos) / (rho * self.pos.r))
        if self.neg.present:
            gate = gate + torch.sigmoid((-t_neg - self.tau) / (rho * self.neg.r))
        return gate

    def mix(self, omega: float) -> torch.Tensor:
        """softmax(w / omega), the bit-width distribution of Eq. 12."""
        return torch.softmax(self.w / omega, dim=0)

    def mixed_bits(self, omega: float) -> torch.Tensor:
        """w-bar of Eq. 14."""
        return (self.mix(omega) * torch.tensor(self.bit_widths, dtype=torch.float32, device=self.w.device)).sum()

    def soft(self, rho: float, omega: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau~ = softplus(kappa) M (.) Q_M(tau), ||M||_1): the training-time task vector
        and its gate mass, through one fused autograd node (:class:`GatedTaskVector`)."""
        t_pos, t_neg = self.thresholds()
        inv_pos = 1.0 / (rho * self.pos.r) if self.pos.present else 0.0
        inv_neg = 1.0 / (rho * self.neg.r) if self.neg.present else 0.0
        return GatedTaskVector.apply(t_pos, t_neg, F.softplus(self.kappa), self.mix(omega), self.tau, self.levels,
                                     inv_pos, inv_neg)

    @torch.no_grad()
    def hard(self, rho: float) -> tuple[torch.Tensor, int, float]:
        """(M_hard = M > 0.5, b = W[argmax w] (Eq. 15), softplus(kappa))."""
        return self.gate(rho) > 0.5, self.bit_widths[int(self.w.argmax())], float(F.softplus(self.kappa))


# --------------------------------------------------------------------------- training


@dataclass
class FlexSwitchSettings:
    loss: str
    lam: float
    steps: int
    batch_size: int
    lr_lgs: float
    lr_bas: float
    rho: float
    omega: float
    decay: float
    decay_every: int
    bit_widths: tuple[int, ...]

    @staticmethod
    def from_hparams(hp: Mapping[str, Any]) -> "FlexSwitchSettings":
        """From a method's checked hyperparameters (see FLEXSWITCH_HPARAMS)."""
        loss = str(hp["loss"])
        bit_widths = tuple(int(b) for b in hp["bit_widths"])
        lam = DEFAULT_LAMBDA[loss] if hp["lambda"] is None else float(hp["lambda"])
        return FlexSwitchSettings(loss, lam, int(hp["steps"]), int(hp["batch_size"]), float(hp["lr_lgs"]),
                                  float(hp["lr_bas"]), float(hp["rho"]), float(hp["omega"]), float(hp["decay"]),
                                  int(hp["decay_every"]), bit_widths)

    def temperatures(self, step: int) -> tuple[float, float]:
        """rho and omega after ``step`` steps: x decay every ``decay_every`` steps."""
        factor = self.decay ** (step // self.decay_every)
        return self.rho * factor, self.omega * factor


@dataclass
class TrainedSwitch:
    """One task's FlexSwitch result: the compressed tensors and what training reached."""

    tensors: dict[str, Any]  # key -> CompressedTensor (SASS)
    seconds: float
    final_loss: float
    final_preservation: float


def outputs_under(encoder: nn.Module, head: nn.Module, params: Mapping[str, torch.Tensor], **inputs) -> torch.Tensor:
    """head(encoder(inputs)) with ``params`` in place of the encoder's own tensors."""
    return head(functional_call(encoder, params, args=(), kwargs=inputs))


def train_flexswitch(pool: ModelPool, task: str, exemplars: Mapping[str, torch.Tensor],
                     settings: FlexSwitchSettings, seed: int, encoder: nn.Module,
                     device: torch.device = torch.device("cpu"), precision: str = "fp32") -> TrainedSwitch:
    """Optimise Eq. 14 for one task and return its SASS-encoded task vector. ``encoder`` is on
    ``device``, where the gates, the weights and the exemplars go and the steps run (the
    forward passes under ``precision``; the gated weights are built in float32)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    head = pool.backbone.task(task).head().eval().requires_grad_(False).to(device)
    keys = [key for key in pool.merged_keys if torch.count_nonzero(pool.task_vector(task, key))]
    gates = nn.ModuleDict({key.replace(".", "/"): TensorGate(pool.task_vector(task, key), settings.bit_widths)
                           for key in keys}).to(device)
    pretrained = {key: pool.pretrained(key).float().to(device) for key in keys}
    n = next(iter(exemplars.values())).shape[0]
    exemplars = to_device(dict(exemplars), device)
    # the fine-tuned model's outputs on the exemplars are fixed: compute them once
    finetuned = {key: pretrained[key] + gates[key.replace(".", "/")].tau for key in keys}
    teacher = batched_features(partial(outputs_under, encoder, head, finetuned), exemplars, device=device,
                               precision=precision).to(device)
    del finetuned
    lgs = [p for g in gates.values() for p in (g.s_pos, g.s_neg, g.kappa)]
    bas = [g.w for g in gates.values()]
    optimizer = torch.optim.Adam([{"params": lgs, "lr": settings.lr_lgs}, {"params": bas, "lr": settings.lr_bas}])
    total = sum(g.tau.numel() for g in gates.values())
    preserve = PRESERVATION_LOSSES[settings.loss]
    loss = preservation = torch.tensor(0.0)
    for step in tqdm(range(settings.steps), desc=f"flexswitch {task}", unit="step", leave=False):
        rho, omega = settings.temperatures(step)
        batch = torch.randperm(n, generator=generator)[: settings.batch_size].to(device)
        params, sparsity, bits = {}, 0.0, 0.0
        for key in keys:
            gate = gates[key.replace(".", "/")]
            delta, mass = gate.soft(rho, omega)
            params[key] = pretrained[key] + delta
            sparsity = sparsity + mass
            bits = bits + gate.mixed_bits(omega)
        with autocast(device, precision):
            outputs = head(functional_call(encoder, params, args=(), kwargs={k: v[batch] for k, v in exemplars.items()}))
        preservation = preserve(outputs.float(), teacher[batch])
        loss = sparsity / total + bits / (len(keys) * max(settings.bit_widths)) + settings.lam * preservation
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rho, _ = settings.temperatures(settings.steps - 1)
    tensors = {}
    for key in keys:
        gate = gates[key.replace(".", "/")]
        mask, bits, scale = gate.hard(rho)
        tensors[key] = quantized_from_task_vector(gate.tau.cpu(), mask.cpu(), bits, "sass", scale=scale,
                                                  bounds=gate.bounds)
    return TrainedSwitch(tensors, time.perf_counter() - start, float(loss.detach()), float(preservation.detach()))


def switch_statistics(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Sparsity and bit-width reached: overall, and per tensor (for the by-type/by-layer summary)."""
    n = sum(t.n for t in tensors.values())
    kept = sum(t.n_kept for t in tensors.values())
    return {
        "sparsity": 1.0 - kept / n if n else 1.0,
        "mean_bits": float(np.mean([t.bits for t in tensors.values()])) if tensors else 0.0,
        "kept_weighted_bits": sum(t.bits * t.n_kept for t in tensors.values()) / kept if kept else 0.0,
        "tensors": {key: {"n": t.n, "sparsity": round(t.sparsity, 6), "bits": t.bits} for key, t in tensors.items()},
    }


def training_key(pool: ModelPool, task: str, exemplars: Mapping[str, torch.Tensor], settings: FlexSwitchSettings,
                 seed: int) -> str:
    """What a trained switch depends on: both checkpoints (path, size, mtime), the settings,
    the seed and the exemplars' bytes."""
    digest = hashlib.sha256()
    for path in (pool.backbone.pretrained_checkpoint(), pool.backbone.finetuned_checkpoint(task)):
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(json.dumps({"settings": asdict(settings), "seed": seed, "task": task}, sort_keys=True).encode())
    for name in sorted(exemplars):
        digest.update(name.encode() + exemplars[name].contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


CACHE_CONTENT = "flexswitch/training"
RECORD_FIELDS = ("seconds", "final_loss", "final_preservation")


def read_cached_switch(path: Path, key: str) -> tuple[dict[str, CompressedTensor], dict[str, float]]:
    """The switches and training record (``seconds``, ``final_loss``, ``final_preservation``)
    of one cache entry; CorruptArtifactError naming the file if it is not a whole entry for ``key``."""
    contents = read_artifact(path)
    contents.expect_content(CACHE_CONTENT)
    if contents.metadata.get("key") != key:
        raise contents.error(f"is the entry of training {contents.metadata.get('key')!r}, expected {key!r}")
    record = {name: float(contents.field(name, (int, float))) for name in RECORD_FIELDS}
    if not (math.isfinite(record["seconds"]) and record["seconds"] >= 0):
        raise contents.error(f"training seconds {record['seconds']} is not a duration")
    return {name: contents.compressed(name) for name in contents}, record


def stored_as(tensors: Mapping[str, CompressedTensor], fmt: str) -> bytes:
    """The container of one task's switches with every tensor laid out as ``fmt``: the same
    shape, mask, codes and parameters (the cache keeps SASS; the layout is chosen at storing)."""
    return encode_tensors({key: t if t.fmt == fmt else replace(t, fmt=fmt) for key, t in tensors.items()})


def trained_switch(pool: ModelPool, task: str, exemplars: Mapping[str, torch.Tensor], settings: FlexSwitchSettings,
                   seed: int, encoder: nn.Module, reuse: bool, device: torch.device = torch.device("cpu"),
                   precision: str = "fp32", fmt: str = "sass") -> tuple[bytes, dict[str, Any], float | None]:
    """One task's artifact (its switches laid out as ``fmt``), its training record and, when
    the switch was read back from the cache instead of trained, the seconds its training
    originally took (else None).

    Every training is cached under $MERGEBENCH_CACHE/flexswitch as one container holding the
    switches and the training record, keyed by :func:`training_key`; with ``reuse`` such an
    entry is read back, e.g. by auto-flexswitch after flexswitch. A corrupt entry is reported
    with a warning naming it and trained again (and rewritten), so it never blocks a run."""
    key = training_key(pool, task, exemplars, settings, seed)
    path = cache_dir() / "flexswitch" / f"{task}-{key}.mbc"
    if reuse and path.exists():
        try:
            tensors, record = read_cached_switch(path, key)
        except CorruptArtifactError as error:
            warnings.warn(f"flexswitch: training cache entry {path} is corrupt, training {task!r} again ({error})",
                          stacklevel=2)
        else:
            stats = {**record, "seconds": round(record["seconds"], 2), **switch_statistics(tensors)}
            return stored_as(tensors, fmt), {**stats, "reused": True}, record["seconds"]
    trained = train_flexswitch(pool, task, exemplars, settings, seed, encoder, device, precision)
    record = {"seconds": trained.seconds, "final_loss": trained.final_loss,
              "final_preservation": trained.final_preservation}
    write_artifact(path, trained.tensors, {"content": CACHE_CONTENT, "key": key, **record})
    stats = {**record, "seconds": round(trained.seconds, 2), **switch_statistics(trained.tensors)}
    return stored_as(trained.tensors, fmt), {**stats, "reused": False}, None


def train_switches(pool: ModelPool, exemplars: Mapping[str, Any], hparams: Mapping[str, Any], seed: int,
                   encoder: nn.Module, device: torch.device = torch.device("cpu"),
                   precision: str = "fp32") -> tuple[dict[str, bytes], dict[str, Any], float | None]:
    """The switches of every task, trained or read back from the cache: their artifacts
    (``<task>.<format>``), each task's training record, and the original cost of the ones read
    back (None: none was). The format is not part of the training key: one trained switch
    serves every layout."""
    settings = FlexSwitchSettings.from_hparams(hparams)
    fmt = str(hparams["format"])
    artifacts, training, reused = {}, {}, []
    for k, task in enumerate(tqdm(pool.tasks, desc="flexswitch: training", unit="task")):
        artifacts[f"{task}.{fmt}"], training[task], seconds = trained_switch(
            pool, task, exemplars[task], settings, seed * 1000 + k, encoder, bool(hparams["reuse_training"]),
            device, precision, fmt)
        if seconds is not None:
            reused.append(seconds)
    return artifacts, training, sum(reused) if reused else None


FLEXSWITCH_HPARAMS = {
    "loss": Choice("kl", LOSSES, "the performance-preservation loss (Eqs. 9-11)"),
    "lambda": Float(None, "weight of the preservation loss (null: the loss's default, KL 1, MSE 1, CKA 10)", 0.0,
                    nullable=True),
    "exemplars": Int(100, "N: unlabelled training inputs per task the switches are trained on", 1),
    "batch_size": Int(32, "exemplars in one training step", 1),
    "steps": Int(500, "Adam steps of the joint LGS + BAS training", 0),
    "lr_lgs": Float(0.05, "learning rate of the thresholds and the scale (s+, s-, kappa)", 0.0, low_open=True),
    "lr_bas": Float(0.1, "learning rate of the bit-width logits w", 0.0, low_open=True),
    "rho": Float(1.0, "initial temperature of the soft gate", 0.0, low_open=True),
    "omega": Float(1.0, "initial temperature of the bit-width softmax", 0.0, low_open=True),
    "decay": Float(0.9, "factor on rho and omega every decay_every steps", 0.0, 1.0, low_open=True),
    "decay_every": Int(10, "steps between two temperature decays", 1),
    "bit_widths": IntList([1, 2, 4, 8], "W: the candidate bit-widths of the values", choices=(1, 2, 4, 8)),
    "reuse_training": Bool(True, "load a switch trained earlier on the same inputs and settings from the cache"),
    "format": Choice("sass", SWITCH_FORMATS, "the storage layout of the switches (same values in every layout): "
                     "sass, the paper's grouped COO (§III-D); ans, entropy-coded mask and codes; indep, a "
                     "dense b-bit code per entry"),
}


@register_method("flexswitch")
class FlexSwitch(Method):
    hyperparameters = dict(FLEXSWITCH_HPARAMS)
    needs_exemplars = True
    uses_task_identity = True
    dynamic = True

    def check_applicable(self, backbone) -> None:
        super().check_applicable(backbone)
        self.resolved_hyperparameters(backbone)  # raises if the loss asked for does not apply to its outputs

    def resolved_hyperparameters(self, backbone) -> dict[str, Any]:
        """The loss this backbone's outputs take (:func:`resolve_loss`) and, for a null lambda,
        that loss's default: the record names the values the switches were trained with."""
        hparams = {**super().resolved_hyperparameters(backbone), "loss": resolve_loss(self, backbone)}
        hparams["lambda"] = FlexSwitchSettings.from_hparams(hparams).lam
        return hparams

    def merge(self, pool, exemplars=None):
        if not exemplars:
            raise ValueError(f"{self.name} needs exemplars to train its switches")
        hparams = self.resolved_hyperparameters(pool.backbone)
        # training and the router's query features run on the run's device; the Merged starts on the CPU
        encoder = load_encoder(pool.backbone, pool.pretrained_state()).requires_grad_(False).to(self.device)
        artifacts, training, reused = train_switches(pool, exemplars, hparams, self.seed, encoder, self.device,
                                                     self.precision)
        store = SwitchStore(pool.tasks, artifacts, f".{hparams['format']}")
        router, routing_artifacts, routing_record = self.routing(pool, exemplars, encoder)
        encoder.to("cpu")
        return ComposedMerged(pool.backbone, encoder, store, router=router, artifacts={**artifacts, **routing_artifacts},
                              diagnostics={"flexswitch": {**training, **routing_record}},
                              reused_training_seconds=reused, routing=self.hparams.get("routing", "per-input"))

    def routing(self, pool: ModelPool, exemplars: Mapping[str, Any],
                encoder: nn.Module) -> tuple[KNNRouter | None, dict[str, bytes], dict[str, Any]]:
        """The router, what it stores and what its training reached (FlexSwitch: the task identity, none)."""
        return None, {}, {}

    def rebuild(self, pool, artifacts):
        encoder = load_encoder(pool.backbone, pool.pretrained_state())
        store = SwitchStore(pool.tasks, dict(artifacts), f".{self.hparams['format']}")
        return ComposedMerged(pool.backbone, encoder, store, router=self.stored_router(pool, artifacts, encoder),
                              artifacts=dict(artifacts), routing=self.hparams.get("routing", "per-input"))

    def stored_router(self, pool, artifacts: Mapping[str, bytes], encoder: nn.Module) -> KNNRouter | None:
        """The router read back from the stored artifacts (FlexSwitch: the task identity, none)."""
        return None


# --------------------------------------------------------------------------- routing


def kmeans_centres(features: torch.Tensor, centres: int, seed: int) -> torch.Tensor:
    """E K-means centres of one task's query features (scikit-learn, k-means++ init, 10 restarts)."""
    from sklearn.cluster import KMeans

    centres = min(centres, len(features))
    model = KMeans(n_clusters=centres, n_init=10, random_state=seed).fit(features.double().numpy())
    return torch.from_numpy(model.cluster_centers_).float()


def metric_loss(projection: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                owners: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Eq. 19: -mean_i log( sum_{z in N_i ∩ A_{k_i}} 1/d_L(x_i, z) / sum_{z in N_i} 1/d_L(x_i, z) ),
    N_i the C nearest centres of x_i under d_L (Eq. 18)."""
    distances = torch.cdist(features @ projection.T, centres @ projection.T).clamp_min(1e-12)
    nearest = distances.topk(neighbours, largest=False).indices
    inverse = 1.0 / distances.gather(1, nearest)
    own = (owners[nearest] == labels[:, None]).float()
    return -torch.log((inverse * own).sum(1).clamp_min(1e-12) / inverse.sum(1)).mean()


def learn_metric(features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, owners: torch.Tensor,
                 rank: int, neighbours: int, lr: float, epochs: int, seed: int) -> tuple[torch.Tensor, list[float]]:
    """The low-rank projection L (rank x e) minimising Eq. 19 by full-batch Adam."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rank, features.shape[1])
    initial = torch.linalg.qr(torch.randn(features.shape[1], rank, generator=generator)).Q.T  # orthonormal rows
    projection = nn.Parameter(initial.contiguous())
    optimizer = torch.optim.Adam([projection], lr=lr)
    history = []
    for _ in range(epochs):
        loss = metric_loss(projection, features, labels, centres, owners, neighbours)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        history.append(float(metric_loss(projection, features, labels, centres, owners, neighbours)))
    return projection.detach(), history


ROUTER = "router.mbc"
ROUTER_CONTENT = "auto-flexswitch/router"


def encode_router(projection: torch.Tensor, centres: torch.Tensor, owners: torch.Tensor, tasks: list[str],
                  neighbours: int) -> bytes:
    """The learned metric L (r x e), the projected centres L c (one row per centre), the task of
    each centre, and C."""
    return encode_tensors({"projection": projection.float().contiguous(), "centres": centres.float().contiguous(),
                           "owners": owners.long()},
                          {"content": ROUTER_CONTENT, "tasks": list(tasks), "neighbours": int(neighbours)})


def decode_router(data: bytes, tasks: list[str], name: str = ROUTER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(projection, projected centres, owners, neighbours) of a stored router, checked."""
    contents = decode_tensors(data, source=name)
    contents.expect_content(ROUTER_CONTENT)
    if contents.metadata.get("tasks") != list(tasks):
        raise contents.error(f"built for tasks {contents.metadata.get('tasks')}, the pool has {list(tasks)}")
    projection = contents.dense("projection", torch.float32)
    if projection.dim() != 2:
        raise contents.error(f"has shape {list(projection.shape)}, expected (rank, features)", "projection")
    centres = contents.dense("centres", torch.float32)
    if centres.dim() != 2 or centres.shape[1] != projection.shape[0]:
        raise contents.error(f"has shape {list(centres.shape)}, expected (centres, {projection.shape[0]})", "centres")
    owners = contents.dense("owners", torch.int64, (len(centres),))
    if len(owners) and (int(owners.min()) < 0 or int(owners.max()) >= len(tasks)):
        raise contents.error(f"task indices outside 0..{len(tasks) - 1}", "owners")
    neighbours = contents.field("neighbours", int)
    if not 1 <= neighbours <= len(centres):
        raise contents.error(f"{neighbours} neighbours for {len(centres)} centres")
    return projection, centres, owners, neighbours


@register_method("auto-flexswitch")
class AutoFlexSwitch(FlexSwitch):
    """FlexSwitch's switches, then the routing that replaces the task identity."""

    hyperparameters = {
        **FLEXSWITCH_HPARAMS,
        "centres": Int(20, "E: K-means centres per task", 1),
        "rank": Int(32, "r: rank of the learned projection L", 1),
        "metric_lr": Float(0.5, "Adam learning rate of L", 0.0, low_open=True),
        "metric_epochs": Int(100, "full-batch epochs of the metric learning (Eq. 19)", 0),
        "neighbours": Int(10, "C: nearest centres that vote for the task weights", 1),
        # per-batch: the T-Switch authors' released Auto-Switch code; the Auto-FlexSwitch paper routes per input
        "routing": Choice("per-input", ROUTING_MODES, "per-input: each input its own k-NN weights (Eq. 5); "
                          "per-batch: their batch mean (uses single-task batches)"),
    }
    uses_task_identity = False

    def merge(self, pool, exemplars=None):
        available = int(self.hparams["centres"]) * len(pool.tasks)
        if int(self.hparams["neighbours"]) > available:
            raise HyperparameterError(f"method {self.name!r}: neighbours={self.hparams['neighbours']} exceeds the "
                                      f"{available} centres of {len(pool.tasks)} tasks")
        return super().merge(pool, exemplars)

    def routing(self, pool, exemplars, encoder):
        """k-NN over K-means centres of the pretrained query features, in the learned metric."""
        start = time.perf_counter()
        routing = routing_view(pool.backbone.tasks)
        routed = routing.routing_features
        # query sets: pretrained features f_ex(x; Theta) of the exemplars (Eq. 5)
        queries = [routed(features) for features in per_task_features(encoder, exemplars, pool.tasks, self.device,
                                                                     self.precision)]
        # a detector gives one vector per object query: each is a query of its task, and an image is
        # composed by the majority vote of its queries' k-NN weights (§IV-A2; KNNRouter)
        queries = [q.reshape(-1, q.shape[-1]) for q in queries]
        features = torch.cat(queries).float()
        labels = task_indices(queries)
        centres = [kmeans_centres(q.float(), int(self.hparams["centres"]), self.seed) for q in queries]
        owners = task_indices(centres)
        centres = torch.cat(centres)
        neighbours = int(self.hparams["neighbours"])
        if neighbours > len(centres):
            raise HyperparameterError(f"method {self.name!r}: neighbours={neighbours} exceeds the {len(centres)} "
                                      f"K-means centres (fewer query features than centres)")
        projection, history = learn_metric(features, labels, centres, owners, int(self.hparams["rank"]), neighbours,
                                           float(self.hparams["metric_lr"]), int(self.hparams["metric_epochs"]),
                                           self.seed)
        # what routing keeps beside the switches: L and the projected centres with their tasks; the
        # router reads them back from the stored bytes
        stored = encode_router(projection, centres @ projection.T, owners, pool.tasks, neighbours)
        router = self.stored_router(pool, {ROUTER: stored}, encoder)
        record = {"seconds": round(time.perf_counter() - start, 2), "loss_start": history[0], "loss_end": history[-1]}
        return router, {ROUTER: stored}, {"metric": record}

    def stored_router(self, pool, artifacts, encoder):
        """k-NN over the stored projected centres, inputs projected by the stored metric L."""
        if ROUTER not in artifacts:
            raise CorruptArtifactError(f"missing Auto-FlexSwitch artifact {ROUTER}")
        projection, projected, owners, neighbours = decode_router(artifacts[ROUTER], pool.tasks)
        routing = routing_view(pool.backbone.tasks)
        routed = routing.routing_features
        return KNNRouter(lambda inputs: routed(encoder(**inputs)).to(projection.device) @ projection.T, projected, owners,
                         len(pool.tasks), neighbours, by_parts=routing.routes_by_parts)
