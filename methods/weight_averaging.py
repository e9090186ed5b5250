"""Weight Averaging: theta = mean_k theta_k (Wortsman et al., "Model soups", ICML 2022;
the 'Weight Averaging' baseline of the T-Switch and Auto-FlexSwitch tables)."""
from __future__ import annotations

from mergebench.merging import merge_elementwise
from mergebench.method import Method, StaticMerged
from mergebench.registry import register_method


@register_method("weight-averaging")
class WeightAveraging(Method):

    def merge(self, pool, exemplars=None):
        # mean of the fine-tuned weights == pretrained + mean of the task vectors
        state = merge_elementwise(pool, lambda taus: taus.mean(0), desc=self.name)
        return StaticMerged(pool.backbone, state)
