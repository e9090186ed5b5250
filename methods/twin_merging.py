"""Twin-Merging (Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise
in Model Merging", NeurIPS 2024; authors' code ``LZY-the-boys/Twin-Merging``).

* Shared expert theta_s: a static merge of the task vectors, by default Task
  Arithmetic with lambda = 0.3 (hyperparameters ``shared`` / ``shared_scaling``;
  ``shared`` may name any registered static, exemplar-free method, e.g. ``ties``).
* Exclusive experts: for every merged tensor that is the weight of an ``nn.Linear``
  of the encoder, theta_k - theta_s is compressed by truncated SVD to rank r
  (``rank``, default 16: for a 384x384 MiniLM matrix that is 16*(384+384+1) floats,
  ~8% of the matrix; the authors' discriminative setting keeps a small fraction).
  Every other tensor (biases, LayerNorm, embeddings -- also 2-D but not a Linear
  weight) stays at the shared expert.
* Router: the authors' ``SimpleMLP`` (Linear d->2d, BatchNorm, LeakyReLU, Dropout
  0.5, Linear 2d->2d, BatchNorm, LeakyReLU, Dropout, Linear 2d->K) trained with
  cross-entropy to predict the task index of the exemplars from encoder features
  (full-batch Adam, lr 5e-4, ``router_steps`` steps, seeded with the run seed).
  ``router_features``: "shared" (default, as the authors' router.py: features of the
  shared expert) or "pretrained" (features of the pretrained encoder).
  The features are ``Task.routing_features`` of the encoder output; tasks that route by
  several vectors per input (a detector's object queries) are read as their mean.
  At inference w(x) = softmax(router(features(x))).
* theta(x) = theta_s + sum_k w_k(x) U_k S_k V_k^T on the Linear weights.

Inference without per-sample weights (``TwinMerged``): the encoder holds theta_s and
each Linear with exclusive experts carries a forward hook that adds, per sample b,
``sum_k w_k[b] ((h_b @ V_k) * S_k) @ U_k^T``. This is exact, because a Linear layer
is linear in its weight: h (W_s + sum_k w_k U_k S_k V_k^T)^T + bias
= (h W_s^T + bias) + sum_k w_k ((h V_k) * S_k) U_k^T, and the hook sees exactly
h = the layer's input of sample b under theta(x_b) (every earlier layer is itself
already corrected for sample b), so the whole network equals a forward with
materialised weights theta(x_b), for every sample at once.

Storage (``artifacts()``), each a file of the checksummed container of
``mergebench.container``: the shared expert as a full state dict (``shared.mbc``;
Twin-Merging keeps theta_s beside the pretrained model, which the router reads; the
T-Switch paper's Table 2 charges it as large storage), the fp32 U, S, V factors of each
task (``<task>.experts.mbc``) and the router's state dict with the feature
standardisation (``router.mbc``). Inference decodes the factors and the router from
these bytes.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mergebench.container import decode_tensors, encode_tensors
from mergebench.dynamic import RoutedMerged
from mergebench.errors import CorruptArtifactError, HyperparameterError
from mergebench.exemplars import per_task_features, task_indices
from mergebench.hyperparameters import Choice, Float, Hyperparameter, Int
from mergebench.method import Method, load_encoder
from mergebench.pool import ModelPool
from mergebench.registry import METHODS, register_method
from mergebench.task import routing_view

SHARED = "shared.mbc"
ROUTER = "router.mbc"
SHARED_CONTENT = "twin-merging/shared"
EXPERTS_CONTENT = "twin-merging/experts"
ROUTER_CONTENT = "twin-merging/router"


def experts_artifact(task: str) -> str:
    return f"{task}.experts.mbc"


class RouterMLP(nn.Module):
    """The authors' ``SimpleMLP`` router, on standardised features."""

    def __init__(self, dim: int, num_tasks: int, hidden: int, dropout: float = 0.5):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_tasks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.reshape(len(features), -1).float()
        return self.net((features - self.mean) / self.std)


def train_router(features: torch.Tensor, labels: torch.Tensor, num_tasks: int, steps: int, lr: float,
                 seed: int, hidden: int | None = None) -> RouterMLP:
    features = features.reshape(len(features), -1).float()
    dim = features.shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        router = RouterMLP(dim, num_tasks, hidden or 2 * dim)
        router.mean.copy_(features.mean(0))
        router.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
        optimizer = torch.optim.Adam(router.parameters(), lr=lr)
        router.train()
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(router(features), labels).backward()
            optimizer.step()
    return router.eval()


def encode_router(router: RouterMLP, tasks: list[str]) -> bytes:
    """The router's state dict; its metadata holds the sizes that rebuild the module."""
    first = router.net[0]
    return encode_tensors(router.state_dict(), {"content": ROUTER_CONTENT, "tasks": list(tasks),
                                                "dim": first.in_features, "hidden": first.out_features})


def decode_router(data: bytes, tasks: list[str], name: str = ROUTER) -> RouterMLP:
    """The stored router, in eval mode, checked against the pool's tasks and the module's
    state dict (every entry present, of its dtype and shape)."""
    contents = decode_tensors(data, source=name)
    contents.expect_content(ROUTER_CONTENT)
    if contents.metadata.get("tasks") != list(tasks):
        raise contents.error(f"built for tasks {contents.metadata.get('tasks')}, the pool has {list(tasks)}")
    dim, hidden = contents.field("dim", int), contents.field("hidden", int)
    if dim < 1 or hidden < 1:
        raise contents.error(f"router sizes dim={dim}, hidden={hidden} are not positive")
    with torch.device("meta"):  # shapes only: the stored tensors are assigned below
        router = RouterMLP(dim, len(tasks), hidden)
    expected = router.state_dict()
    if set(contents) != set(expected):
        missing, extra = sorted(set(expected) - set(contents)), sorted(set(contents) - set(expected))
        raise contents.error(f"not the router's state dict (missing: {missing}, extra: {extra})")
    state = {key: contents.dense(key, value.dtype, value.shape) for key, value in expected.items()}
    router.load_state_dict(state, assign=True)
    return router.eval()


def decode_experts(data: bytes, task: str, name: str | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """{key: (U, S, V)} of one task's exclusive experts, fp32, U (out, r), S (r,), V (in, r)."""
    contents = decode_tensors(data, source=name or experts_artifact(task))
    contents.expect_content(EXPERTS_CONTENT)
    if contents.metadata.get("task") != task:
        raise contents.error(f"holds the experts of task {contents.metadata.get('task')!r}, expected {task!r}")
    factors = {}
    for key in sorted({entry.rsplit(".", 1)[0] for entry in contents}):
        u, s, v = (contents.dense(f"{key}.{part}", torch.float32) for part in "USV")
        if u.dim() != 2 or s.dim() != 1 or v.dim() != 2 or not u.shape[1] == v.shape[1] == len(s):
            raise contents.error(f"factor shapes {list(u.shape)}, {list(s.shape)}, {list(v.shape)} are not "
                                 f"U (out, r), S (r,), V (in, r)", f"{key}.U")
        factors[key] = (u, s, v)
    if 3 * len(factors) != len(contents):
        raise contents.error("holds entries that are not U, S, V factors")
    return factors


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD delta ~ U diag(S) V^T with U (out, r), S (r,), V (in, r)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    return u[:, :r].float().contiguous(), s[:r].float().contiguous(), vh[:r].T.float().contiguous()


def linear_weight_keys(encoder: nn.Module, keys: list[str]) -> list[str]:
    """The merged keys that are the weight of an nn.Linear of the encoder."""
    modules = dict(encoder.named_modules())
    return [k for k in keys if k.endswith(".weight") and isinstance(modules.get(k[: -len(".weight")]), nn.Linear)]


def routing_input(backbone, features: torch.Tensor) -> torch.Tensor:
    """What the router reads from encoder features: one vector per input. Several vectors per
    input (DETR's 100 object queries) are averaged; flattened, they would make a 25600-wide
    input and a router of billions of parameters."""
    routing = routing_view(backbone.tasks)
    features = routing.routing_features(features)
    return features.mean(1) if routing.routes_by_parts else features


class TwinMerged(RoutedMerged):
    """theta_s in one encoder plus low-rank exclusive experts applied by forward hooks
    with per-sample routing weights (see the module docstring for why it is exact).
    With a router, w(x) = softmax(router(features(x))), the features being the pretrained
    encoder's (``router_features`` "pretrained") or the shared expert's."""

    def __init__(self, pool: ModelPool, shared: Mapping[str, torch.Tensor], artifacts: dict[str, bytes],
                 router: RouterMLP | None = None, router_features: str = "pretrained"):
        super().__init__(pool.backbone, pool.tasks, router=router, artifacts=artifacts)
        self.encoder = load_encoder(pool.backbone, shared)
        self.router_features = router_features
        self.feature_encoder = None
        if router_features == "pretrained":
            self.feature_encoder = load_encoder(pool.backbone, pool.pretrained_state())
        # the factors used at inference are decoded from the stored bytes
        self.factors = self.stacked_factors(artifacts)
        self.expert_keys = sorted(self.factors)
        self._weights: torch.Tensor | None = None  # (B, K) for the forward in progress
        modules = dict(self.encoder.named_modules())
        self._hooks = [modules[key[: -len(".weight")]].register_forward_hook(self._hook(key)) for key in self.expert_keys]

    def stacked_factors(self, artifacts: Mapping[str, bytes]) -> dict[str, tuple[torch.Tensor, ...]]:
        """{key: (U, S, V)} stacked over the tasks, (K, out, r), (K, r), (K, in, r), each checked
        against the other tasks' and the encoder's Linear weight."""
        modules = dict(self.encoder.named_modules())
        decoded, keys = [], None
        for task in self.tasks:
            name = experts_artifact(task)
            if name not in artifacts:
                raise CorruptArtifactError(f"missing Twin-Merging artifact {name}")
            factors = decode_experts(artifacts[name], task)
            keys = sorted(factors) if keys is None else keys
            if sorted(factors) != keys:
                raise CorruptArtifactError(f"{name}: experts for {sorted(factors)}, "
                                           f"{experts_artifact(self.tasks[0])} has them for {keys}")
            for key, (u, _, v) in factors.items():
                linear = modules.get(key.removesuffix(".weight"))
                if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != (len(u), len(v)):
                    raise CorruptArtifactError(f"{name}: tensor {key + '.U'!r}: no Linear weight of shape "
                                               f"{[len(u), len(v)]} in the encoder")
            decoded.append(factors)
        stacked = {}
        for key in keys or []:
            shapes = [[list(part.shape) for part in d[key]] for d in decoded]
            for task, shape in zip(self.tasks, shapes):
                if shape != shapes[0]:
                    raise CorruptArtifactError(f"{experts_artifact(task)}: tensor {key + '.U'!r}: U, S, V of shapes "
                                               f"{shape}, {experts_artifact(self.tasks[0])} has {shapes[0]}")
            stacked[key] = tuple(torch.stack([d[key][i] for d in decoded]) for i in range(3))
        return stacked

    def to(self, device: torch.device | str) -> "TwinMerged":
        """The encoders, router and the experts' factors on ``device``."""
        super().to(device)
        self.factors = {key: tuple(part.to(self.device) for part in parts) for key, parts in self.factors.items()}
        return self

    def _hook(self, key: str):
        def hook(module, args, output):
            weights = self._weights
            if weights is None:
                return None
            U, S, V = self.factors[key]  # (K, out, r), (K, r), (K, in, r), read here: ``to`` may move them
            h = args[0]
            if h.shape[0] != weights.shape[0]:
                raise RuntimeError(f"twin-merging: {key} input batch {h.shape[0]} != routing batch {weights.shape[0]}")
            flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(V.dtype)  # (B, N, in)
            z = torch.einsum("bni,kir->bknr", flat, V) * S[None, :, None, :]
            z = z * weights.to(z.device, z.dtype)[:, :, None, None]
            delta = torch.einsum("bknr,kor->bno", z, U)
            return output + delta.reshape(output.shape).to(output.dtype)

        return hook

    @torch.no_grad()
    def features_for_routing(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.feature_encoder is not None:
            return routing_input(self.backbone, self.feature_encoder(**inputs))
        self._weights = None  # the shared expert alone
        return routing_input(self.backbone, self.encoder(**inputs))

    def route(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return torch.softmax(self.router(self.features_for_routing(inputs)), dim=-1)

    @torch.no_grad()
    def features(self, inputs: Mapping[str, Any], weights: torch.Tensor) -> torch.Tensor:
        """One forward of the shared expert, each Linear's hook adding its inputs' experts."""
        self._weights = weights
        try:
            return self.encoder(**inputs)
        finally:
            self._weights = None


@register_method("twin-merging")
class TwinMerging(Method):
    hyperparameters = {
        "exemplars": Int(100, "N: unlabelled training inputs per task the router is trained on", 1),
        "rank": Int(16, "r: rank of each exclusive expert's truncated SVD", 1),
        "shared": Hyperparameter("str", "task-arithmetic", "the shared expert: a static, exemplar-free method (e.g. ties)"),
        "shared_scaling": Float(0.3, "lambda of the shared expert's merge, where it has one", 0.0),
        "router_steps": Int(500, "full-batch Adam steps of the router", 0),
        "router_lr": Float(5e-4, "Adam learning rate of the router", 0.0, low_open=True),
        # the authors embed inputs with the shared expert
        "router_features": Choice("shared", ("shared", "pretrained"), "encoder whose features the router reads"),
    }
    needs_exemplars = True
    dynamic = True
    uses_task_identity = False

    def check_hyperparameters(self) -> None:
        static = [name for name, cls in METHODS.items()
                  if not (cls.needs_exemplars or cls.dynamic or cls.reference)]
        if self.hparams["shared"] not in static:
            raise HyperparameterError(f"method 'twin-merging': hyperparameter shared={self.hparams['shared']!r} is "
                                      f"not allowed; expected a static exemplar-free method: {', '.join(static)}")

    def shared_state(self, pool: ModelPool) -> dict[str, torch.Tensor]:
        method_class = METHODS.get(self.hparams["shared"])
        overrides = {"scaling": float(self.hparams["shared_scaling"])} if "scaling" in method_class.hyperparameters else {}
        method = method_class(**overrides)
        method.seed = self.seed
        return {k: v.detach().clone() for k, v in method.merge(pool).encoder.state_dict().items()}

    def build(self, pool: ModelPool) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """The shared expert and the artifacts (shared state, per-task U/S/V factors)."""
        rank = int(self.hparams["rank"])
        shared = self.shared_state(pool)
        keys = linear_weight_keys(pool.backbone.build_encoder(), pool.merged_keys)
        artifacts = {SHARED: encode_tensors(shared, {"content": SHARED_CONTENT})}
        for task in pool.tasks:
            factors = {}
            for key in keys:
                u, s, v = svd_factors(pool.finetuned(task, key).float() - shared[key].float(), rank)
                factors.update({f"{key}.U": u, f"{key}.S": s, f"{key}.V": v})
            artifacts[experts_artifact(task)] = encode_tensors(factors, {"content": EXPERTS_CONTENT, "task": task})
        return shared, artifacts

    def merge(self, pool, exemplars: Mapping[str, Any] | None = None):
        if not exemplars:
            raise ValueError("twin-merging needs exemplars to train its router")
        shared, artifacts = self.build(pool)
        features = self.router_training_features(pool, shared, exemplars)
        router = train_router(torch.cat(features), task_indices(features), len(pool.tasks),
                              int(self.hparams["router_steps"]), float(self.hparams["router_lr"]), self.seed)
        artifacts[ROUTER] = encode_router(router, pool.tasks)
        # inference reads the stored router
        return TwinMerged(pool, shared, artifacts, decode_router(artifacts[ROUTER], pool.tasks),
                          self.hparams["router_features"])

    def router_training_features(self, pool: ModelPool, shared: Mapping[str, torch.Tensor],
                                 exemplars: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per task, what the router reads from its exemplars (an encoder of its own, freed
        before the merged model builds its encoders)."""
        state = shared if self.hparams["router_features"] == "shared" else pool.pretrained_state()
        encoder = load_encoder(pool.backbone, state)
        return per_task_features(lambda **inputs: routing_input(pool.backbone, encoder(**inputs)), exemplars,
                                 pool.tasks)
