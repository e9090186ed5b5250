"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023).

Sources checked for the defaults and details below:
* the authors' code, github.com/bloomberg/dataless-model-merging:
  ``src/model_merge/local_trainer.py`` (``compute_grams``: forward hooks on every
  nn.Linear, Gram = running mean of x^T x over all token rows),
  ``src/model_merge/avg_merger.py`` (``regmean_mean_params``, ``reduce_non_diag``:
  off-diagonal entries times a, diagonal kept; ``torch.inverse(sum G) @ sum G W^T``;
  every other parameter averaged) and
  ``src/configs/exps/roberta-base/glue/roberta-base-regmean.yaml`` (``gram_n_example: 1000``);
* FusionBench, github.com/tanganke/fusion_bench: ``fusion_bench/method/regmean/regmean.py``
  (``reduce_non_diagonal_elements``, ``merging_with_regmean_weights``) and
  ``config/method/regmean/clip_regmean.yaml`` (``num_regmean_examples: 256``,
  ``reduce_non_diagonal_ratio`` 0.95 for CLIP; 0.1 in its base config).

What is computed
* For every nn.Linear inside the encoder and every task k, the Gram matrix of the
  layer's inputs under fine-tuned model k on task k's exemplars, G_k = X_k^T X_k / n_k
  (the mean over the n_k input rows, as the authors' running mean; each task weighs the
  same whatever its token count). Padding: when the batch has an ``attention_mask`` and
  the layer's input is (batch, tokens, features) with the mask's shape, only real tokens
  (mask != 0) are counted; the authors count padding rows too. Inputs of any other
  shape (e.g. pooled features, CLIP patches) use every row.
* Off-diagonal scaling G~_k = alpha G_k + (1 - alpha) diag(G_k), alpha = 0.9 (the
  paper's setting for its reported results; the same operation as the authors'
  ``reduce_non_diag(G, a=alpha)`` and FusionBench's ``reduce_non_diagonal_ratio``).
* Merged weight, in nn.Linear's transposed (in, out) space:
  W^T = (sum_k G~_k)^-1 sum_k G~_k W_k^T, solved in float64 with ``torch.linalg.solve``.
  An input feature that is zero on every exemplar of every task has a zero row and
  column in every G~_k (Grams are positive semi-definite); its weight column takes the
  plain mean of the W_k. If the system is still singular (possible only with alpha = 1)
  the least-norm solution (pseudo-inverse) is used. With alpha < 1 and no dead feature,
  sum G~ is positive definite.
* Biases and every other floating tensor: the plain mean of the fine-tuned values.
  Non-floating tensors keep their pretrained values.

Defaults: 256 exemplars per task (FusionBench's ``num_regmean_examples``; the authors use
1000 on GLUE -- 256 fits every offline suite, tiny's training split has 256 examples,
and gives Fisher and RegMean the same exemplars), alpha 0.9.

Memory: task by task; held at once are one fine-tuned encoder, that model's Grams, the
running float64 sums sum_k G~_k (in x in per linear layer) and sum_k G~_k W_k^T (the
size of the linear weights), and the running sum of every other merged tensor.

Device: the forward passes that collect the Grams run on the run's device under its
precision (autocast; the Grams are summed in float64, float32 on MPS, which has no
float64) and come back to the CPU, where the system is solved in float64.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from mergebench.device import autocast, to_device
from mergebench.exemplars import example_count, select_examples, task_exemplars
from mergebench.hyperparameters import Float, Int
from mergebench.merging import finetuned_mean
from mergebench.method import Method, StaticMerged
from mergebench.registry import register_method

BATCH_SIZE = 64  # exemplars per forward pass while collecting Grams


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): off-diagonal entries times alpha, diagonal kept."""
    scaled = gram * alpha
    scaled.diagonal().copy_(gram.diagonal())
    return scaled


class GramCollector:
    """Forward hooks that sum x^T x and count rows of the inputs of named nn.Linear modules."""

    def __init__(self, modules: Mapping[str, nn.Linear], dtype: torch.dtype = torch.float64):
        self.modules = dict(modules)
        self.dtype = dtype  # of the sums: float64, float32 where the device has no float64 (MPS)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            mask = self.mask
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask != 0]
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.to(self.dtype)
            gram = rows.T @ rows
            if name in self.sums:
                self.sums[name] += gram
                self.counts[name] += rows.shape[0]
            else:
                self.sums[name] = gram
                self.counts[name] = rows.shape[0]

        return hook

    @contextmanager
    def attached(self) -> Iterator["GramCollector"]:
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def grams(self) -> dict[str, torch.Tensor]:
        """G = X^T X / n per module, float64 on the CPU (zeros for a module that saw no rows)."""
        out = {}
        for name, module in self.modules.items():
            n = self.counts.get(name, 0)
            if n == 0:
                out[name] = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
            else:
                out[name] = self.sums[name].to("cpu", torch.float64) / n
        return out


@torch.no_grad()
def input_grams(
    encoder: nn.Module, modules: Mapping[str, nn.Linear], inputs: Mapping[str, Any],
    device: torch.device = torch.device("cpu"), precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """The Gram matrix of each named linear module's inputs over a batch of exemplars
    (padding tokens left out when an ``attention_mask`` is given). ``encoder`` is on
    ``device``, where the batches run under ``precision``; the Grams come back on the CPU."""
    encoder.eval()
    collector = GramCollector(modules, torch.float32 if device.type == "mps" else torch.float64)
    n = example_count(inputs)
    with collector.attached():
        for start in range(0, n, BATCH_SIZE):
            batch = to_device(select_examples(inputs, start, start + BATCH_SIZE), device)
            mask = batch.get("attention_mask")
            collector.mask = mask if isinstance(mask, torch.Tensor) else None
            with autocast(device, precision):
                encoder(**batch)
    return collector.grams()


def solve_regmean(
    gram_sum: torch.Tensor, weighted_sum: torch.Tensor, mean_weight: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """W^T solving (sum G~) W^T = sum G~ W_k^T. A feature dead in every Gram (zero
    diagonal, hence zero row and column) gets the mean weight column: its row of W^T is
    taken from ``mean_weight()`` (the mean of the W_k, (out, in); called only if needed)."""
    a, b = gram_sum.clone(), weighted_sum.clone()
    dead = a.diagonal() <= 0
    if bool(dead.any()):
        a[dead, :] = 0.0
        a[:, dead] = 0.0
        a[dead, dead] = 1.0
        b[dead] = mean_weight().to(b.dtype).T[dead]
    try:
        return torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(a) @ b


@register_method("regmean")
class RegMean(Method):
    needs_exemplars = True
    hyperparameters = {
        "exemplars": Int(256, "N: unlabelled training inputs per task the Gram matrices are built from", 1),
        "alpha": Float(0.9, "off-diagonal scaling of the Gram matrices (1: plain RegMean)", 0.0, 1.0),
    }

    def merge(self, pool, exemplars=None):
        alpha = float(self.hparams["alpha"])
        inputs = {task: task_exemplars(self.name, exemplars, task) for task in pool.tasks}
        backbone = pool.backbone
        merged_keys = set(pool.merged_keys)

        encoder = backbone.build_encoder().to(self.device)  # the forward passes run on the run's device
        linear = {
            name: module
            for name, module in encoder.named_modules()
            if isinstance(module, nn.Linear) and f"{name}.weight" in merged_keys
        }
        weight_keys = {f"{name}.weight": name for name in linear}
        gram_sums: dict[str, torch.Tensor] = {}  # sum_k G~_k            (in, in)
        weighted_sums: dict[str, torch.Tensor] = {}  # sum_k G~_k W_k^T  (in, out)
        sums: dict[str, torch.Tensor] = {}  # sum_k theta_k, every merged tensor but the linear weights

        for task in tqdm(pool.tasks, desc=self.name, unit="task", leave=False):
            encoder.load_state_dict(pool.finetuned_state(task), strict=True)
            grams = input_grams(encoder, linear, inputs[task], self.device, self.precision)
            theta = encoder.state_dict()
            for name, gram in grams.items():
                g = scale_off_diagonal(gram, alpha)
                w_t = theta[f"{name}.weight"].detach().cpu().to(torch.float64).T
                if name in gram_sums:
                    gram_sums[name] += g
                    weighted_sums[name] += g @ w_t
                else:
                    gram_sums[name], weighted_sums[name] = g, g @ w_t
            for key in merged_keys - weight_keys.keys():
                value = theta[key].detach().cpu()
                value = value.to(torch.promote_types(value.dtype, torch.float32))
                sums[key] = sums[key] + value if key in sums else value.clone()
            del grams, theta

        k = len(pool.tasks)
        state: dict[str, torch.Tensor] = {}
        for key in pool.keys():
            pre = pool.pretrained(key)
            if key in weight_keys:
                name = weight_keys[key]
                w_t = solve_regmean(gram_sums.pop(name), weighted_sums.pop(name), lambda: finetuned_mean(pool, key))
                state[key] = w_t.T.to(pre.dtype).contiguous()
            elif key in merged_keys:
                state[key] = (sums.pop(key) / k).to(pre.dtype).contiguous()
            else:
                state[key] = pre
        return StaticMerged(backbone, state)
