"""Task Arithmetic: theta = theta_pre + lambda * sum_k tau_k (Ilharco et al., "Editing
models with task arithmetic", ICLR 2023). lambda = 0.3 is the value the T-Switch,
EMR-Merging and AdaMerging papers use for 8 ViT tasks."""
from __future__ import annotations

from mergebench.hyperparameters import Float
from mergebench.merging import merge_elementwise
from mergebench.method import Method, StaticMerged
from mergebench.registry import register_method


@register_method("task-arithmetic")
class TaskArithmetic(Method):
    hyperparameters = {"scaling": Float(0.3, "lambda: the factor on the sum of task vectors", 0.0)}

    def merge(self, pool, exemplars=None):
        scaling = float(self.hparams["scaling"])
        state = merge_elementwise(pool, lambda taus: scaling * taus.sum(0), desc=self.name)
        return StaticMerged(pool.backbone, state)
