"""Dynamic inference: the compact per-task parts of a merge, composed per input.

:class:`RoutedMerged` is what every dynamic method builds: the routing weights w(x)
(one-hot on the known task, or a router's), the routing accuracy, the stored
artifacts and the diagnostics, all given at construction. :class:`ComposedMerged`
runs theta(x) = theta_pre + sum_k w_k(x) * tau_hat_k without one weight
materialisation per sample: the inputs of a batch are grouped by their
routing-weight vectors (Auto-Switch weights are multiples of 1/C, so a batch has few
distinct vectors). A batch of one vector runs through ``torch.func.functional_call``
under a whole merged weight set kept in a small LRU cache; several vectors run as one
layered forward in which each composed module runs every group's slice of the batch
under that group's tensors, built module by module (or, where a cost model says so, the
group's dominant task's tensors plus per-input corrections), so that no module is
copied and no small group pays for a whole weight set.
"""
from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergebench.backbone import Backbone
from mergebench.method import Merged

Router = Callable[[Mapping[str, Any]], torch.Tensor]  # inputs -> (batch, K) weights


class TaskVectorStore(abc.ABC):
    """The compressed per-task parts, in a form that is fast to combine."""

    tasks: list[str]
    device: torch.device = torch.device("cpu")  # where ``combine`` runs and wants its weights

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """The tensors some task vector changes."""

    @abc.abstractmethod
    def combine(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[k] * tau_hat_k[key] as a dense float tensor."""

    def combine_into(self, key: str, weights: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
        """out = base + combine(key, weights), the same float operations as a merged weight
        set's tensor; a store that can write into ``out`` without temporaries overrides this."""
        torch.add(base, self.combine(key, weights).to(base.device), out=out)

    def to(self, device: torch.device) -> "TaskVectorStore":
        """Keep the parts on ``device`` (and set ``self.device``) so that ``combine`` runs there.
        The default keeps them where they are (e.g. packed arrays on the host) and
        ``ComposedMerged`` moves each composed tensor to the device; a store of tensors whose
        ``combine`` works on any device overrides this."""
        return self


ROUTING_MODES = ("per-input", "per-batch")


class RoutedMerged(Merged):
    """Per-task parts composed with per-input weights w(x) over ``tasks``.

    Without a router the task identity is used: w is one-hot on the task being evaluated.
    With one, ``route`` gives the weights and every prediction counts how many inputs put
    their largest weight on their own task (the routing accuracy of ``diagnostics``).
    ``routing`` "per-input" composes each input with its own weights (the papers' Eq. 8 /
    Eq. 5, automatic); "per-batch" gives every input of a batch the mean of the batch's
    weights, composed once (the T-Switch authors' released code). Evaluation batches hold
    one task's inputs, so per-batch routing pools the votes of inputs known to share a task:
    close to an oracle, not automatic in deployment, and it depends on the batch size.
    ``artifacts`` are the serialized parts the model was decoded from, charged as storage."""

    def __init__(self, backbone: Backbone, tasks: list[str], *, router: Any = None,
                 artifacts: Mapping[str, bytes] | None = None, diagnostics: Mapping[str, Any] | None = None,
                 reused_training_seconds: float | None = None, routing: str = "per-input"):
        super().__init__(backbone, diagnostics=diagnostics, reused_training_seconds=reused_training_seconds)
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
        self.tasks = list(tasks)
        self.router = router
        self.routing = routing
        self._artifacts = dict(artifacts or {})
        self._routed: dict[str, list[int]] = {}  # task -> [inputs whose top weight is the task, inputs]

    def route(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(batch, K) weights from the router (a subclass whose router is not a callable of
        the inputs says here how to read it)."""
        return self.router(inputs)

    @torch.no_grad()
    def routing_weights(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(batch, K) composition weights: the router's (per input, or their batch mean for
        ``routing`` "per-batch"), or one-hot on the known task."""
        if self.router is not None:
            weights = self.route(inputs)
            if self.routing == "per-batch":
                weights = weights.mean(0, keepdim=True).expand_as(weights).contiguous()
            return weights
        batch = next(iter(inputs.values())).shape[0]
        weights = torch.zeros(batch, len(self.tasks))
        weights[:, self.tasks.index(task)] = 1.0
        return weights

    @abc.abstractmethod
    def features(self, inputs: Mapping[str, Any], weights: torch.Tensor) -> torch.Tensor:
        """Encoder features, each input under the parts composed with its own weights."""

    @torch.no_grad()
    def predict(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        weights = self.routing_weights(task, inputs)
        if self.router is not None:
            counts = self._routed.setdefault(task, [0, 0])
            counts[0] += int((weights.argmax(1) == self.tasks.index(task)).sum())
            counts[1] += len(weights)
        return self.head(task)(self.features(inputs, weights))

    def artifacts(self) -> dict[str, bytes]:
        return dict(self._artifacts)

    def diagnostics(self) -> dict[str, Any]:
        """What the method learned, the size of each stored artifact and, with a router, the
        routing accuracy: the share of inputs whose largest weight goes to their own task."""
        out = super().diagnostics()
        if self._artifacts:
            out["artifact_bytes"] = {name: len(data) for name, data in self._artifacts.items()}
        if self._routed:
            accuracy = {task: hits / total for task, (hits, total) in self._routed.items()}
            out.update(routing_accuracy=accuracy, routing_accuracy_mean=sum(accuracy.values()) / len(accuracy))
        return out


class ComposedMerged(RoutedMerged):
    """theta(x) = theta_pre + sum_k w_k(x) tau_hat_k, the tau_hat_k read from ``store`` and the
    composed weights run through ``encoder`` (the pretrained encoder, which a router may
    share for its features)."""

    def __init__(self, backbone: Backbone, encoder: nn.Module, store: TaskVectorStore, *, router: Router | None = None,
                 artifacts: Mapping[str, bytes] | None = None, diagnostics: Mapping[str, Any] | None = None,
                 reused_training_seconds: float | None = None, cache_bytes: int = 2 * 1024**3,
                 routing: str = "per-input"):
        super().__init__(backbone, store.tasks, router=router, artifacts=artifacts, diagnostics=diagnostics,
                         reused_training_seconds=reused_training_seconds, routing=routing)
        self.encoder = encoder
        state = encoder.state_dict()
        self.pretrained = {key: state[key] for key in store.keys()}
        self.store = store
        self._cache: OrderedDict[tuple[float, ...], dict[str, torch.Tensor]] = OrderedDict()
        self.cache_used = 0  # bytes the cached weight sets hold now (never above cache_bytes)
        self.cache_bytes = cache_bytes  # the budget of the cache (run --cache-mb)
        self.materialisations = 0  # how many times merged weights were built (for tests/benchmarks)
        self.keep_min_inputs = 4  # a group this large gets a whole weight set, kept in the cache (``_layered``)
        # one expansion pass of a task vector over a weight costs about a matmul of the weight with
        # this many rows (``_corrections``): on the 32-token mixed batches of the benchmark, always
        # correcting was slower than never, so this is set below 32
        self.build_rows = 16
        self.corrected_inputs = 0  # (input, task, Linear) corrections applied (for tests/benchmarks)
        self.layered_forwards = 0  # batches run by one layered forward (for tests/benchmarks)
        self._plan = self._layered_plan()
        self._plan_checked = False  # the first layered forward checks that every planned module ran
        self._buffers: dict[tuple, torch.Tensor] = {}  # reused per-module buffers of the layered forward

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    @cache_bytes.setter
    def cache_bytes(self, budget: int) -> None:
        """The merged-weight cache's budget in bytes; least recently used sets go first, and a
        set larger than the whole budget is used without being kept."""
        self._cache_bytes = int(budget)
        self._evict()

    def _evict(self) -> None:
        while self._cache and self.cache_used > self._cache_bytes:
            _, params = self._cache.popitem(last=False)
            self.cache_used -= _nbytes(params)

    def clear_cache(self) -> None:
        """Forget every merged weight set (the next batch builds its weights again)."""
        self._cache.clear()
        self.cache_used = 0

    def to(self, device: torch.device | str) -> "ComposedMerged":
        """The encoder, the pretrained weights and the store (``TaskVectorStore.to``) on
        ``device``: weights are composed there in float32 and the cache holds them there."""
        super().to(device)
        self.pretrained = {key: value.to(self.device) for key, value in self.pretrained.items()}
        self.store.to(self.device)
        self.clear_cache()
        self._buffers.clear()
        return self

    def merged_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        key = tuple(weights.cpu().tolist())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        weights = weights.to(getattr(self.store, "device", torch.device("cpu")))
        params = {}
        for name, base in self.pretrained.items():  # pretrained + combine, written in place
            params[name] = torch.empty_like(base)
            self.store.combine_into(name, weights, base, params[name])
        self.materialisations += 1
        size = _nbytes(params)
        if size <= self._cache_bytes:
            self._cache[key] = params
            self.cache_used += size
            self._evict()
        return params

    @torch.no_grad()
    def features(self, inputs: Mapping[str, Any], weights: torch.Tensor) -> torch.Tensor:
        """One weight set for a batch of equal weights; several groups of equal weights run
        as one layered forward where the encoder's modules allow it (``_layered``), else one
        forward per group."""
        unique, inverse = torch.unique(weights, dim=0, return_inverse=True)
        if len(unique) == 1:
            return functional_call(self.encoder, self.merged_parameters(unique[0]), args=(), kwargs=dict(inputs))
        if self._plan is not None:
            output = self._layered(inputs, unique, inverse)
            if output is not None:
                return output
        return self._grouped(inputs, unique, inverse)

    def _layered_plan(self) -> dict[str, tuple[nn.Module, dict[str, str]]] | None:
        """{module name: (module, {"weight"/"bias": key})} when every composed tensor is the
        weight or bias of a plain Linear, LayerNorm or Embedding (no max_norm), else None."""
        modules = dict(self.encoder.named_modules())
        plan: dict[str, tuple[nn.Module, dict[str, str]]] = {}
        for key in self.pretrained:
            name, _, attribute = key.rpartition(".")
            module = modules.get(name)
            if type(module) not in LAYERED or attribute not in ("weight", "bias") or \
                    getattr(module, "max_norm", None) is not None:
                return None
            plan.setdefault(name, (module, {}))[1][attribute] = key
        return plan

    def _layered(self, inputs: Mapping[str, Any], unique: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor | None:
        """One forward of the whole batch, its inputs sorted by group, in which every module with
        composed tensors runs each group's contiguous slice under that group's tensors. The
        network is then, for each input, the forward under its own theta(x) (every module sees
        the input's own activations), with the other modules batched. A group's tensors come
        from the cache, from a whole set built and kept for a group of at least
        ``keep_min_inputs`` inputs (likely to recur, e.g. a task's one-hot vector), or else are
        built module by module into reused buffers, which saves the allocation of a whole weight
        set per small group and one encoder call per group. Returns None (and the grouped path
        is used from then on) if a planned module never ran or saw an input that is not the
        batch: a parent reading its parameters directly (``nn.MultiheadAttention``'s out_proj)."""
        batch = len(inverse)
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(unique)).tolist()
        groups, start = [], 0
        for row, count in zip(unique, counts):
            key = tuple(row.cpu().tolist())
            params = None
            if key in self._cache or count >= self.keep_min_inputs:
                params = self.merged_parameters(row)
            groups.append((row.to(self.store.device), start, start + count, params))
            start += count
        sorted_inputs = {name: value[order.to(value.device)] if isinstance(value, torch.Tensor) and value.dim() > 0
                         and value.shape[0] == batch else value for name, value in inputs.items()}
        fired: set[str] | None = None if self._plan_checked else set()
        patched = []
        try:
            for name, (module, parts) in self._plan.items():
                module.forward = self._group_forward(name, module, parts, groups, batch, fired)
                patched.append(module)
            features = self.encoder(**sorted_inputs)
        except _NotLayered:
            self._plan = None
            return None
        finally:
            for module in patched:
                del module.forward
        if fired is not None:
            if set(self._plan) - fired:
                self._plan = None
                return None
            self._plan_checked = True
        self.layered_forwards += 1
        output = torch.empty_like(features)
        output[order.to(features.device)] = features
        return output

    def _group_forward(self, name: str, module: nn.Module, parts: dict[str, str], groups: list, batch: int,
                       fired: set[str] | None):
        """The forward of ``module`` for one layered pass: each group's slice of the input under
        the group's weight and bias (an input of batch 1, shared by the batch like BERT's
        position ids, gives each group its own output for all of its inputs)."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            if fired is not None:
                fired.add(name)
            if x.shape[0] not in (batch, 1):
                raise _NotLayered(name)
            if type(module) is nn.Linear and x.shape[0] == batch:
                return self._linear_forward(module, parts, groups, x, batch)
            out = None
            for row, start, stop, params in groups:
                weight, bias = (self._group_tensor(module, parts.get(attribute), attribute, row, params)
                                for attribute in ("weight", "bias"))
                part = x[start:stop] if x.shape[0] == batch else x
                result = _module_forward(module, part, weight, bias)
                if out is None:
                    out = result.new_empty((batch, *result.shape[1:]))
                out[start:stop] = result
            return out

        return forward

    def _linear_forward(self, module: nn.Linear, parts: dict[str, str], groups: list, x: torch.Tensor,
                        batch: int) -> torch.Tensor:
        """A Linear over the sorted batch: each group's rows times its own weight, or, where the cost
        model (``_corrections``) says so, times the one-hot weight of its dominant task a,
        theta_pre + tau_a, plus the remaining sum_k (w_k - [k = a]) (x tau_k^T) per input, exact
        because a Linear is linear in its weight. The corrections of task k for every such group
        are one matmul over their rows. The group's own bias is always composed (it is small)."""
        weight_key = parts.get("weight")
        rows = x[0].numel() // x.shape[-1]  # rows this Linear multiplies per input (e.g. tokens)
        out = x.new_empty((batch, *x.shape[1:-1], module.out_features))
        corrections: dict[int, list[tuple[int, int, float]]] = {}
        bases: dict[int, torch.Tensor] = {}  # dominant task -> theta_pre + tau_a of this weight
        for row, start, stop, params in groups:
            bias = self._group_tensor(module, parts.get("bias"), "bias", row, params)
            plan = None
            if weight_key is not None and params is None:
                plan = self._corrections(row, (stop - start) * rows)
            if plan is None:
                weight = self._group_tensor(module, weight_key, "weight", row, params)
            else:
                dominant, remaining = plan
                weight = bases.get(dominant)
                if weight is None:
                    weight = bases[dominant] = self._task_tensor(weight_key, dominant, ("base", dominant),
                                                                 self.pretrained[weight_key])
                for k, coefficient in remaining:
                    corrections.setdefault(k, []).append((start, stop, coefficient))
            flat, target = x[start:stop].reshape(-1, x.shape[-1]), out[start:stop].view(-1, module.out_features)
            if bias is None:
                torch.mm(flat, weight.t(), out=target)
            else:
                torch.addmm(bias, flat, weight.t(), out=target)
        for k, spans in corrections.items():
            tau = self._task_tensor(weight_key, k, ("task",), self._zeros(weight_key))
            index = torch.cat([torch.arange(start, stop, device=x.device) for start, stop, _ in spans])
            scale = torch.cat([torch.full((stop - start,), c, dtype=x.dtype, device=x.device) for start, stop, c in spans])
            z = torch.matmul(x[index], tau.t())
            out.index_add_(0, index, z.mul_(scale.view(-1, *[1] * (z.dim() - 1))))
            self.corrected_inputs += len(index)
        return out

    def _corrections(self, row: torch.Tensor, rows: int) -> tuple[int, list[tuple[int, float]]] | None:
        """For a group of ``rows`` Linear rows with weights ``row``: (its dominant task a, the
        remaining coefficients (k, w_k - [k = a])) when multiplying its rows by those d task
        vectors costs less than building its own weight (one expansion pass per active task,
        each costing about ``build_rows`` rows of matmul), else None."""
        dominant = int(row.argmax())
        remaining = row.clone()
        remaining[dominant] -= 1
        active = remaining.nonzero().flatten().tolist()
        if len(active) * rows >= self.build_rows * int((row != 0).sum()):
            return None
        return dominant, [(k, float(remaining[k])) for k in active]

    def _task_tensor(self, key: str, k: int, slot: tuple, base: torch.Tensor) -> torch.Tensor:
        """base + tau_hat_k[key] in a reused buffer (the one-hot composition of task k)."""
        onehot = torch.zeros(len(self.store.tasks), device=self.store.device)
        onehot[k] = 1.0
        buffer = self._buffer(slot, base)
        self.store.combine_into(key, onehot, base, buffer)
        return buffer

    def _zeros(self, key: str) -> torch.Tensor:
        return self._buffer(("zeros",), self.pretrained[key], zeros=True)

    def _buffer(self, slot: tuple, like: torch.Tensor, *, zeros: bool = False) -> torch.Tensor:
        """The reused buffer of ``slot`` shaped as ``like`` (allocated on first use; zero-filled
        once if ``zeros``)."""
        key = (*slot, like.shape, like.dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.zeros_like(like) if zeros else torch.empty_like(like)
        return buffer

    def _group_tensor(self, module: nn.Module, key: str | None, attribute: str, row: torch.Tensor,
                      params: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
        """A module's weight or bias for one group: its own if no task vector changes it, the
        group's whole set's, or built now into a buffer reused by the next module and group."""
        if key is None:
            return getattr(module, attribute, None)
        if params is not None:
            return params[key]
        base = self.pretrained[key]
        buffer = self._buffer((attribute,), base)
        self.store.combine_into(key, row, base, buffer)
        return buffer

    def _grouped(self, inputs: Mapping[str, Any], unique: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """One forward per group of inputs with equal weights, each under its whole weight set."""
        output = None
        for group, row in enumerate(unique):
            index = (inverse == group).nonzero().squeeze(1).to(self.device)
            subset = {name: value[index] for name, value in inputs.items()}
            features = functional_call(self.encoder, self.merged_parameters(row), args=(), kwargs=subset)
            if output is None:
                output = features.new_empty((len(inverse), *features.shape[1:]))
            output[index] = features
        return output


class KNNRouter:
    """w_k(x) = |Q_k ∩ N_x| / C over the C nearest query features (Euclidean), the
    Auto-Switch rule (T-Switch Eq. 8 / Auto-FlexSwitch Eq. 5).

    With ``by_parts`` (tasks that ``routes_by_parts``) the features are (batch, T, D),
    T vectors per input, e.g. DETR's T object queries. Auto-FlexSwitch §IV-A2: "since
    DETR returns multiple object queries per sample, we first aggregate the KNN prediction
    probabilities for each sample via majority voting before performing the merging".
    Here each vector is routed against the query set (which then holds every vector of
    every exemplar), votes for the task its k-NN weights favour, and the input is composed
    with the task most of its vectors vote for: w(x) one-hot on the majority (ties go to
    the lower task index).
    """

    def __init__(self, extract: Callable[[Mapping[str, Any]], torch.Tensor], queries: torch.Tensor,
                 owners: torch.Tensor, num_tasks: int, neighbours: int, by_parts: bool = False):
        if by_parts and queries.dim() == 3:  # (N, T, D): each of an exemplar's T vectors is a query of its task
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
        self.by_parts = by_parts

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return self.weights_for_features(self.extract(inputs))

    def weights_for_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.by_parts:
            return self.majority_weights(features)
        return self.knn_weights(features.reshape(len(features), -1))

    def knn_weights(self, features: torch.Tensor) -> torch.Tensor:
        """(n, D) vectors -> (n, K) shares of their C nearest queries per task."""
        distances = torch.cdist(features.float().to(self.queries.device), self.queries)
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


LAYERED = (nn.Linear, nn.LayerNorm, nn.Embedding)  # modules the layered forward composes per group


class _NotLayered(Exception):
    """A planned module saw an input whose first dimension is not the batch."""


def _module_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s forward (one of ``LAYERED``) with the given weight and bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    return F.embedding(x, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq, module.sparse)


def _nbytes(params: Mapping[str, torch.Tensor]) -> int:
    return sum(value.numel() * value.element_size() for value in params.values())
