"""DARE: Drop And REscale, then Task Arithmetic (Yu et al., "Language Models are
Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024;
authors' MergeLM ``mask_input_with_mask_rate`` with random strategy and rescaling).

Every entry of every task vector is dropped independently with probability p and
the survivors are rescaled by 1/(1-p); the sparsified task vectors are merged by
Task Arithmetic. Defaults p = 0.5, lambda = 0.3 (the FusionBench CLIP setting).
The drop masks come from a generator seeded by (run seed, task, tensor name), so a
run is reproducible and independent of the order tensors are visited in.
"""
from __future__ import annotations

import zlib

import torch

from mergebench.hyperparameters import Float
from mergebench.merging import merge_task_vectors
from mergebench.method import Method, StaticMerged
from mergebench.registry import register_method
from mergebench.sparsify import drop_and_rescale


@register_method("dare")
class Dare(Method):
    hyperparameters = {
        "drop_rate": Float(0.5, "p: the probability of dropping each task-vector entry", 0.0, 1.0, high_open=True),
        "scaling": Float(0.3, "lambda: the factor on the sum of the rescaled task vectors", 0.0),
    }

    def merge(self, pool, exemplars=None):
        p, scaling = float(self.hparams["drop_rate"]), float(self.hparams["scaling"])

        def combine(key, taus):
            total = torch.zeros_like(taus[0])
            for task, tau in zip(pool.tasks, taus):
                generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{task}/{key}".encode()))
                total += drop_and_rescale(tau, p, generator)
            return scaling * total

        return StaticMerged(pool.backbone, merge_task_vectors(pool, combine, desc=self.name))
