"""Dynamic inference: theta(x) = theta_pre + sum_k w_k(x) * tau_hat_k, without one
weight materialisation per sample.

The inputs of a batch are grouped by their routing-weight vectors (Auto-Switch
weights are multiples of 1/C, so a batch has few distinct vectors); merged
weights are built once per distinct vector and kept in a small LRU cache, and the
encoder runs through ``torch.func.functional_call`` so no module is copied.
"""
from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch.func import functional_call

from mergebench.backbone import Backbone
from mergebench.method import Merged

Router = Callable[[Mapping[str, Any]], torch.Tensor]  # inputs -> (batch, K) weights


class TaskVectorStore(abc.ABC):
    """The compressed per-task parts, in a form that is fast to combine."""

    tasks: list[str]

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """The tensors some task vector changes."""

    @abc.abstractmethod
    def combine(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[k] * tau_hat_k[key] as a dense float tensor."""


class DynamicMerged(Merged):
    def __init__(
        self,
        backbone: Backbone,
        pretrained: Mapping[str, torch.Tensor],
        store: TaskVectorStore,
        router: Router | None = None,
        cache_bytes: int = 2 * 1024**3,
        artifacts: Mapping[str, bytes] | None = None,
    ):
        super().__init__(backbone)
        self.stored = dict(artifacts or {})  # the serialized parts this model was decoded from
        self.encoder = backbone.build_encoder().eval()
        self.encoder.load_state_dict(dict(pretrained), strict=True)
        self.pretrained = {key: pretrained[key] for key in store.keys()}
        self.store = store
        self.router = router
        entry_bytes = sum(t.numel() * 4 for t in self.pretrained.values()) or 1
        self.cache_size = max(1, cache_bytes // entry_bytes)  # how many merged weight sets fit the budget
        self._cache: OrderedDict[tuple[float, ...], dict[str, torch.Tensor]] = OrderedDict()
        self.materialisations = 0  # how many times merged weights were built (for tests/benchmarks)
        self._routed: dict[str, list[int]] = {}  # task -> [inputs whose top weight is the task, inputs]

    def artifacts(self) -> dict[str, bytes]:
        return dict(self.stored)

    def routing_weights(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(batch, K) composition weights: the router's, or one-hot on the known task."""
        if self.router is not None:
            return self.router(inputs)
        batch = next(iter(inputs.values())).shape[0]
        weights = torch.zeros(batch, len(self.store.tasks))
        weights[:, self.store.tasks.index(task)] = 1.0
        return weights

    def merged_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        key = tuple(weights.tolist())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        params = {name: self.pretrained[name] + self.store.combine(name, weights) for name in self.pretrained}
        self.materialisations += 1
        self._cache[key] = params
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return params

    @torch.no_grad()
    def features(self, inputs: Mapping[str, Any], weights: torch.Tensor) -> torch.Tensor:
        """Encoder features, each input under its own composed weights, one forward per group."""
        unique, inverse = torch.unique(weights, dim=0, return_inverse=True)
        if len(unique) == 1:
            return functional_call(self.encoder, self.merged_parameters(unique[0]), args=(), kwargs=dict(inputs))
        output = None
        for group, row in enumerate(unique):
            index = (inverse == group).nonzero().squeeze(1)
            subset = {name: value[index] for name, value in inputs.items()}
            features = functional_call(self.encoder, self.merged_parameters(row), args=(), kwargs=subset)
            if output is None:
                output = features.new_empty((weights.shape[0], *features.shape[1:]))
            output[index] = features
        return output

    @torch.no_grad()
    def predict(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        weights = self.routing_weights(task, inputs)
        if self.router is not None:
            hits = int((weights.argmax(1) == self.store.tasks.index(task)).sum())
            counts = self._routed.setdefault(task, [0, 0])
            counts[0] += hits
            counts[1] += len(weights)
        return self.head(task)(self.features(inputs, weights))

    def diagnostics(self) -> dict[str, Any]:
        """The size of each stored artifact and, with a router, the routing accuracy: the
        share of inputs whose largest weight goes to their own task."""
        sizes = {"artifact_bytes": {name: len(data) for name, data in self.stored.items()}} if self.stored else {}
        if not self._routed:
            return sizes
        accuracy = {task: hits / total for task, (hits, total) in self._routed.items()}
        return {**sizes, "routing_accuracy": accuracy, "routing_accuracy_mean": sum(accuracy.values()) / len(accuracy)}


class KNNRouter:
    """w_k(x) = |Q_k ∩ N_x| / C over the C nearest query features (Euclidean), the
    Auto-Switch rule (T-Switch Eq. 8 / Auto-FlexSwitch Eq. 5).

    Features of shape (batch, T, D) give T vectors per input, e.g. DETR's T object
    queries. Auto-FlexSwitch §IV-A2: "since DETR returns multiple object queries per
    sample, we first aggregate the KNN prediction probabilities for each sample via
    majority voting before performing the merging". Here each vector is routed against
    the query set (which then holds every vector of every exemplar), votes for the task
    its k-NN weights favour, and the input is composed with the task most of its vectors
    vote for: w(x) one-hot on the majority (ties go to the lower task index).
    """

    def __init__(self, extract: Callable[[Mapping[str, Any]], torch.Tensor], queries: torch.Tensor,
                 owners: torch.Tensor, num_tasks: int, neighbours: int):
        if queries.dim() == 3:  # (N, T, D): each of an exemplar's T vectors is a query of its task
            owners = owners.repeat_interleave(queries.shape[1])
            queries = queries.flatten(0, 1)
        queries = queries.reshape(len(queries), -1).float()
        if neighbours > len(queries):
            raise ValueError(f"{neighbours} neighbours asked, the query set has {len(queries)} features")
        self.extract = extract
        self.queries = queries
        self.owners = owners
        self.num_tasks = num_tasks
        self.neighbours = neighbours

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return self.weights_for_features(self.extract(inputs))

    def weights_for_features(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:
            return self.majority_weights(features)
        return self.knn_weights(features.reshape(len(features), -1))

    def knn_weights(self, features: torch.Tensor) -> torch.Tensor:
        """(n, D) vectors -> (n, K) shares of their C nearest queries per task."""
        distances = torch.cdist(features.float(), self.queries)
        nearest = distances.topk(self.neighbours, largest=False).indices
        counts = torch.nn.functional.one_hot(self.owners[nearest], self.num_tasks).sum(1)
        return counts.float() / self.neighbours

    def majority_weights(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, T, D) -> (batch, K): one-hot on the task most of an input's T vectors vote for."""
        weights = torch.zeros(len(features), self.num_tasks)
        for i, vectors in enumerate(features):  # one input at a time: distances are T x |queries|
            votes = torch.bincount(self.knn_weights(vectors).argmax(1), minlength=self.num_tasks)
            weights[i, votes.argmax()] = 1.0
        return weights


def batched_features(encoder: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """encoder(**inputs) over a large input batch, ``batch_size`` rows at a time."""
    n = next(iter(inputs.values())).shape[0]
    return torch.cat([encoder(**{k: v[i : i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)])
