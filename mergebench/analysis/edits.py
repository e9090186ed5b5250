"""Edits of one task vector, the controls of the papers' analyses.

Auto-FlexSwitch (arXiv 2604.28109) Sec. III-B, with T-Switch (CVPR 2025) Sec. 3.2-3.3:

* ``keep-high`` (C1, P-Spar): tau (.) g_m(tau), g_m keeping the entries above the
  alpha-quantile of the positive entries and below that of the negative ones
  (``mergebench.sparsify.pulse_mask``); a fraction 1 - alpha survives.
* ``keep-low`` (C2): prune the alpha fraction of *largest* magnitudes of each sign and
  keep the low ones, tau (.) (1 - g_m(tau)) with g_m taken at the (1 - alpha)-quantiles,
  so that a fraction 1 - alpha survives, as in C1 and C3. Eq. 2's text puts C2's
  thresholds at the alpha-quantiles too, which would keep only a fraction alpha and make
  C2 *gain* accuracy as alpha grows; the papers describe C2 as dropping from the outset
  and further as alpha grows (Auto-FlexSwitch Fig. 1; T-Switch Fig. 3, "discarding from
  largest to smallest" at a discard ratio alpha), i.e. alpha of the entries pruned from
  the top, which is what is done here.
* ``random`` (C3): a random fraction alpha of the entries pruned (exactly
  round(alpha n), seeded per task and tensor). Auto-FlexSwitch does not rescale; the
  CVPR paper's control (DARE) rescales the survivors by 1 / (1 - alpha): ``rescale``.
* ``binary`` (B-Approx, Eq. 3): the P-Spar mask at alpha, signs (Eq. 4) and one knob
  beta = ||tau (.) A||_2 / ||A (.) P||_2 per tensor, built through the T-Switch codec
  (``mergebench.codecs.tswitch_from_task_vector``), times the tuning factor ``eta``
  of Exp III (beta <- eta beta).
* ``full``: the task vector unchanged (the Individual fine-tuned model);
  ``pretrained``: no task vector at all (the lower bound).

``group`` limits an edit to the tensors of one module type or layer
(``mergebench.analysis.groups``); every other tensor keeps its full task vector,
the setting of Exp I and II.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from mergebench.analysis.groups import in_group
from mergebench.codecs import tswitch_from_task_vector
from mergebench.sparsify import pulse_mask

KINDS = ("full", "pretrained", "keep-high", "keep-low", "random", "binary")


def keep_low_mask(tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """C2: the complement of the P-Spar mask at 1 - alpha: the int((1 - alpha) n_s) smallest
    magnitudes of each sign s survive, the alpha fraction of largest ones is pruned."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return torch.ones_like(tau, dtype=torch.bool)
    return ~pulse_mask(tau, round(1.0 - alpha, 12))  # (rounded: 1 - 0.9 is 0.09999999999999998)


def random_mask(tau: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """C3: keep a uniformly random set of round((1 - alpha) n) entries."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n = tau.numel()
    keep = round((1.0 - alpha) * n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:keep]] = True
    return mask.view(tau.shape)


def binary_approximation(tau: torch.Tensor, alpha: float, eta: float = 1.0) -> torch.Tensor:
    """B-Approx (Eq. 3): eta * beta * A (.) P with the P-Spar mask A at alpha."""
    switch = tswitch_from_task_vector(tau, pulse_mask(tau, alpha))
    return (eta * switch.to_dense()).to(tau.dtype)


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class Edit:
    """One control applied to every task's own task vector."""

    kind: str
    alpha: float = 0.0
    seed: int = 0
    eta: float = 1.0
    rescale: bool = False
    group: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown edit {self.kind!r}; valid: {', '.join(KINDS)}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"pruning rate alpha must be in [0, 1), got {self.alpha}")

    def spec(self) -> str:
        """A stable name of the edit (the key of the evaluation cache)."""
        parts = [self.kind]
        if self.kind not in ("full", "pretrained"):
            parts.append(f"alpha={self.alpha:g}")
        if self.kind == "random":
            parts.append(f"seed={self.seed}")
            if self.rescale:
                parts.append("rescale")
        if self.kind == "binary" and self.eta != 1.0:
            parts.append(f"eta={self.eta:g}")
        if self.group:
            parts.append(f"group={self.group}")
        return ",".join(parts)

    def apply(self, task: str, key: str, tau: torch.Tensor) -> torch.Tensor:
        """The edited task vector of one tensor of one task."""
        if self.kind == "full" or (self.group is not None and not in_group(key, self.group)):
            return tau
        if self.kind == "pretrained":
            return torch.zeros_like(tau)
        if self.kind == "keep-high":
            return tau * pulse_mask(tau, self.alpha)
        if self.kind == "keep-low":
            return tau * keep_low_mask(tau, self.alpha)
        if self.kind == "random":
            generator = torch.Generator().manual_seed(_seed(self.seed, task, key))
            kept = tau * random_mask(tau, self.alpha, generator)
            return kept / (1.0 - self.alpha) if self.rescale else kept
        return binary_approximation(tau, self.alpha, self.eta)
