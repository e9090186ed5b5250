"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., "TIES-Merging:
Resolving interference when merging models", NeurIPS 2023; authors' code
``ties_merging`` / ``topk_values_mask`` / ``resolve_sign`` / ``disjoint_merge``).

The three steps are ``mergebench.sparsify``'s (AdaMerging++ uses them too).

* Trim: each task vector keeps its top-k% entries by magnitude, the threshold being
  taken over the whole flattened task vector (all merged tensors), as the authors do;
  ties at the threshold are kept (``|tau| >= kth value``).
* Elect: the merged sign of an entry is the sign of the sum of the trimmed values.
  An exact zero sum takes the majority sign; the authors take it over the whole
  model, we take it per tensor (it only decides exact ties, bounded memory).
* Disjoint merge (``merge_func``): "mean" (default), the mean of the trimmed values that
  agree with the elected sign, as the TIES paper (Algorithm 1, "Disjoint Merge") and its
  ``disjoint_merge(..., "dis-mean")`` define it; "sum", their sum ("dis-sum"), what the ViT
  tables of AdaMerging, EMR-Merging and T-Switch run (the AdaMerging authors'
  ``main_ties_merging.py``: ``merge_func = "dis-sum"``) and FusionBench's shipped
  ``config/method/ties_merging.yaml`` (``merge_func: sum``). Both forms elect the sign the same
  way (the sign of the sum of the trimmed values); where K' tasks agree, dis-sum is K' times
  dis-mean.
* theta = theta_pre + lambda * merged; defaults k = 20%, lambda = 0.3 (the ViT
  setting of the AdaMerging / EMR-Merging / T-Switch tables).

Every step but the majority sign is entry by entry, so the merge runs over slices of the
memory-mapped checkpoints (``mergebench.merging.merge_sliced``): per tensor, a first pass
sums the slices' sign balances (exact integers), a second trims, elects and merges each
slice into the result; memory is the merged model and K slices, not K stacked tensors.
The result is bit for bit that of the whole-tensor steps.
"""
from __future__ import annotations

import torch

from mergebench.hyperparameters import Choice, Float
from mergebench.merging import merge_sliced
from mergebench.method import Method, StaticMerged
from mergebench.registry import register_method
from mergebench.sparsify import MERGE_FUNCS, elect_and_merge, sign_balance, trim, trim_thresholds


@register_method("ties")
class Ties(Method):
    hyperparameters = {
        "keep": Float(0.2, "k: the fraction of largest-magnitude entries kept per task vector", 0.0, 1.0, low_open=True),
        "scaling": Float(0.3, "lambda: the factor on the merged task vector", 0.0),
        "merge_func": Choice("mean", MERGE_FUNCS, "disjoint merge of the sign-agreeing trimmed values: "
                             "mean (TIES paper) or sum (dis-sum of the AdaMerging/T-Switch ViT tables)"),
    }

    def merge(self, pool, exemplars=None):
        keep, scaling = float(self.hparams["keep"]), float(self.hparams["scaling"])
        merge_func = str(self.hparams["merge_func"])
        thresholds = torch.tensor(trim_thresholds(pool, keep))

        def combine(slices):
            balance = sum(sign_balance(trim(taus, thresholds)) for taus in slices())
            for taus in slices():
                yield scaling * elect_and_merge(trim(taus, thresholds), merge_func, balance)

        return StaticMerged(pool.backbone, merge_sliced(pool, combine, desc=self.name))
