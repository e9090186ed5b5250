"""Twin-Merging (Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise
in Model Merging", NeurIPS 2024; authors' code ``LZY-the-boys/Twin-Merging``).

* Shared expert theta_s: a static merge of the task vectors, by default Task
  Arithmetic with lambda = 0.3 (hyperparameters ``shared`` / ``shared_scaling``;
  ``shared`` may name any registered static, exemplar-free method, e.g. ``ties``).
* Exclusive experts: theta_k - theta_s per tensor, compressed by truncated SVD (the
  authors' ``sparsify.svd``, called on every tensor of ``theta_t - theta_*`` by
  ``twin_merge.extract_twin_vector`` with ``mask_strategy=svd``).
  ``scope`` "all-2d" (default, the authors'): every merged tensor; matrices are
  SVD'd (a tensor of more than 2 dims as the (dim 0, rest) matrix; the authors' RoBERTa
  has none), 1-D tensors (biases, LayerNorm) are kept dense, as the authors' ``svd``
  returns them unchanged (their run script excludes biases from merging and evaluates
  with the evaluated task's own fine-tuned biases; a dense per-task bias expert is that
  without the task identity). ``scope`` "linear": only the weights of ``nn.Linear``
  modules, every other tensor stays at the shared expert.
  ``rank_rule`` "ratio" (default): r = int(rank_ratio * min(rows, cols)), rounded down as
  the authors' ``new_rank = int(density * len(S))``; their run script's ``mask_rate`` 0.9
  is density (``rank_ratio``) 0.1. A matrix whose r is 0 gets no expert. ``rank_rule``
  "fixed": r = min(``rank``, rows, cols). The T-Switch paper's Table 5 "discard 0.5" for
  Twin-Merging is read here as that mask rate, the one discard rate of the authors' method
  (their shared expert, Task Arithmetic, discards nothing): rank_ratio 0.5.
  ``svd`` "randomized" (default): the top-r factors by a seeded randomized SVD (Halko et
  al. 2011, scikit-learn's ``randomized_svd``) where r + 10 is at most a quarter of the
  smaller side (the default rank ratio 0.1; at 0.5 every matrix takes the exact path),
  whose rank-r error is within 1.01x of the exact optimum on the task vectors
  ``benchmarks/twin_svd.py`` measures, at a fraction of a full SVD's time; "exact": the
  full thin SVD in float64, truncated. The
  authors take the full SVD in the tensor's own precision (``torch.linalg.svd``; on a GPU
  with cuSOLVER's approximate ``gesvda`` driver).
* Router: the authors' ``SimpleMLP`` (Linear d->2d, BatchNorm, LeakyReLU, Dropout
  0.5, Linear 2d->2d, BatchNorm, LeakyReLU, Dropout, Linear 2d->K) trained with
  cross-entropy to predict the task index of the exemplars from encoder features, on
  the method's device. Schedule: ``router_epochs`` passes over the N*K exemplar features
  in seeded shuffled minibatches of ``router_batch_size`` (1024, the authors'
  ``per_device_train_batch_size``; a final batch of one input is dropped, BatchNorm cannot
  train on it), Adam (the HF Trainer's AdamW without weight decay) at ``router_lr`` decayed
  linearly to 0 over the steps (the Trainer's default schedule; ``router_lr_decay``).
  Defaults lr 1e-3 and 10 epochs: the T-Switch paper's Table 5 (the authors' router.py
  trains 50 epochs at 5e-4 on 5,500 inputs per task).
  ``router_features``: "shared" (default, as the authors' router.py: features of the
  shared expert) or "pretrained" (features of the pretrained encoder).
  The features are ``Task.routing_features`` of the encoder output; tasks that route by
  several vectors per input (a detector's object queries) are read as their mean.
  At inference w(x) = softmax(router(features(x))).
* theta(x) = theta_s + sum_k w_k(x) E_k, E_k = U_k S_k V_k^T (or the dense 1-D expert).

Inference without per-sample weights (``TwinMerged``): the encoder holds theta_s and
each module with exclusive experts carries a forward hook that adds the experts of each
sample b. For a Linear weight it adds ``sum_k w_k[b] ((h_b @ V_k) * S_k) @ U_k^T``. This
is exact, because a Linear layer is linear in its weight: h (W_s + sum_k w_k U_k S_k
V_k^T)^T + bias = (h W_s^T + bias) + sum_k w_k ((h V_k) * S_k) U_k^T, and the hook sees
exactly h = the layer's input of sample b under theta(x_b) (every earlier layer is itself
already corrected for sample b), so the whole network equals a forward with materialised
weights theta(x_b), for every sample at once. The same holds for a Linear bias (adds
sum_k w_k b_k), an Embedding table (adds sum_k w_k (U_k[ids] * S_k) V_k^T), a
LayerNorm (adds LN_0(h) * sum_k w_k g_k + sum_k w_k b_k, LN_0 the normalisation without
affine) and a convolution (adds sum_k w_k conv(h, E_k) + sum_k w_k b_k). Experts on any other
tensor (a bare parameter such as CLIP's class embedding) are composed by materialising
theta(x_b) for one sample at a time.

Storage (``artifacts()``), each a file of the checksummed container of
``mergebench.container``: the shared expert as a full state dict (``shared.mbc``;
Twin-Merging keeps theta_s beside the pretrained model, which the router reads; the
T-Switch paper's Table 2 charges it as large storage), the fp32 U, S, V factors and dense
1-D experts of each task (``<task>.experts.mbc``) and the router's state dict with the feature
standardisation (``router.mbc``). Inference decodes the factors and the router from
these bytes.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergebench.container import decode_tensors, encode_tensors
from mergebench.dynamic import RoutedMerged
from mergebench.errors import CorruptArtifactError, HyperparameterError
from mergebench.exemplars import per_task_features, task_indices
from mergebench.hyperparameters import Bool, Choice, Float, Hyperparameter, Int
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


def router_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch: a seeded permutation of n rows cut into batches (a last batch of 1 dropped)."""
    order = torch.randperm(n, generator=generator)
    return [batch for batch in order.split(batch_size) if len(batch) > 1]


def train_router(features: torch.Tensor, labels: torch.Tensor, num_tasks: int, epochs: int, batch_size: int,
                 lr: float, seed: int, lr_decay: bool = True, hidden: int | None = None,
                 device: torch.device | str = "cpu") -> RouterMLP:
    """The router trained by minibatch Adam on ``device`` (see the module docstring), back on the CPU."""
    features = features.reshape(len(features), -1).float()
    dim = features.shape[1]
    generator = torch.Generator().manual_seed(seed)
    epoch_batches = [router_batches(len(features), batch_size, generator) for _ in range(epochs)]
    total = sum(len(batches) for batches in epoch_batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = RouterMLP(dim, num_tasks, hidden or 2 * dim)
        router.mean.copy_(features.mean(0))
        router.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
        router.to(device)
        features, labels = features.to(device), labels.to(device)
        optimizer = torch.optim.Adam(router.parameters(), lr=lr)
        # the HF Trainer's linear schedule: lr * (total - step) / total at step 0, 1, ...
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, (total - step) / total) if lr_decay else 1.0)
        router.train()
        for batches in epoch_batches:
            for batch in batches:
                batch = batch.to(device)
                optimizer.zero_grad()
                F.cross_entropy(router(features[batch]), labels[batch]).backward()
                optimizer.step()
                schedule.step()
    return router.cpu().eval()


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
    """{key: (U, S, V)} of one task's exclusive experts, fp32, U (out, r), S (r,), V (in, r),
    or {key: (D,)} for a dense (1-D) expert."""
    contents = decode_tensors(data, source=name or experts_artifact(task))
    contents.expect_content(EXPERTS_CONTENT)
    if contents.metadata.get("task") != task:
        raise contents.error(f"holds the experts of task {contents.metadata.get('task')!r}, expected {task!r}")
    factors: dict[str, tuple[torch.Tensor, ...]] = {}
    for key in sorted({entry.rsplit(".", 1)[0] for entry in contents}):
        if f"{key}.D" in contents:
            factors[key] = (contents.dense(f"{key}.D", torch.float32),)
            continue
        u, s, v = (contents.dense(f"{key}.{part}", torch.float32) for part in "USV")
        if u.dim() != 2 or s.dim() != 1 or v.dim() != 2 or not u.shape[1] == v.shape[1] == len(s):
            raise contents.error(f"factor shapes {list(u.shape)}, {list(s.shape)}, {list(v.shape)} are not "
                                 f"U (out, r), S (r,), V (in, r)", f"{key}.U")
        factors[key] = (u, s, v)
    if sum(len(parts) for parts in factors.values()) != len(contents):
        raise contents.error("holds entries that are not U, S, V factors or dense experts")
    return factors


OVERSAMPLES = 10  # scikit-learn's randomized_svd default n_oversamples (Halko et al. suggest 5-10)
POWER_ITERATIONS = 7  # scikit-learn's randomized_svd n_iter for a rank below 0.1 x the smaller side


def svd_factors(delta: torch.Tensor, rank: int, method: str = "exact",
                seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD delta ~ U diag(S) V^T with U (out, r), S (r,), V (in, r), fp32.

    "exact": LAPACK's thin SVD of the float64 matrix. "randomized": scikit-learn's
    ``randomized_svd`` (Halko, Martinsson & Tropp 2011, with LU-normalised power iterations
    as Szlam et al. 2014) on the fp32 matrix with the seed ``seed``: 10 oversamples and 7
    power iterations, its defaults for a rank below a tenth of the smaller side (its 4 for a
    larger rank left errors up to 1.016x the optimum on flat spectra). It runs where the
    sketch of r + 10 columns is at most a quarter of the smaller side; beyond, its error
    grows and its time nears the exact SVD's, so such a matrix takes the exact path. Its
    rank-r Frobenius error stays within 1.01x of the exact (Eckart-Young) optimum on the
    task vectors measured by ``benchmarks/twin_svd.py``.
    """
    if method == "randomized" and 4 * (rank + OVERSAMPLES) <= min(delta.shape):
        from sklearn.utils.extmath import randomized_svd  # scikit-learn imports slowly: only here

        u, s, vh = randomized_svd(delta.detach().float().cpu().numpy(), rank, n_oversamples=OVERSAMPLES,
                                  n_iter=POWER_ITERATIONS, random_state=seed)
        return (torch.from_numpy(u).contiguous(), torch.from_numpy(s).contiguous(),
                torch.from_numpy(vh.T).contiguous())
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    return u[:, :r].float().contiguous(), s[:r].float().contiguous(), vh[:r].T.float().contiguous()


def svd_seed(seed: int, key: str, task: int) -> int:
    """The randomized SVD's seed of one (tensor, task): fixed by the run's seed, independent
    of which other tensors get experts."""
    return int(np.random.SeedSequence([seed, zlib.crc32(key.encode()), task]).generate_state(1)[0])


def linear_weight_keys(encoder: nn.Module, keys: list[str]) -> list[str]:
    """The merged keys that are the weight of an nn.Linear of the encoder."""
    modules = dict(encoder.named_modules())
    return [k for k in keys if k.endswith(".weight") and isinstance(modules.get(k[: -len(".weight")]), nn.Linear)]


def expert_rank(shape: tuple[int, ...], rule: str, ratio: float, rank: int) -> int:
    """The rank of the expert of a tensor of ``shape`` (matricised as (dim 0, rest))."""
    smaller = min(shape[0], math.prod(shape[1:]))
    return int(ratio * smaller) if rule == "ratio" else min(rank, smaller)


def module_part(modules: Mapping[str, nn.Module], key: str) -> tuple[str, nn.Module | None, str]:
    """(module name, module, attribute) of a parameter key such as ``layer.0.dense.weight``."""
    name, _, attribute = key.rpartition(".")
    return name, modules.get(name), attribute


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hooked(module: nn.Module | None, attribute: str, dense: bool) -> bool:
    """Whether a forward hook adds this expert exactly (see the module docstring)."""
    if isinstance(module, nn.Linear):
        return attribute == "bias" or (attribute == "weight" and not dense)
    if isinstance(module, nn.Embedding):
        return attribute == "weight" and not dense and module.max_norm is None
    if isinstance(module, nn.LayerNorm):
        return attribute in ("weight", "bias") and dense
    if isinstance(module, CONVOLUTIONS):
        return attribute == "bias" or (attribute == "weight" and not dense)
    return False


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
        by_module: dict[str, list[str]] = {}
        self.materialised_keys: list[str] = []  # experts composed by materialising theta(x_b), one sample at a time
        for key in self.expert_keys:
            name, module, attribute = module_part(modules, key)
            if hooked(module, attribute, len(self.factors[key]) == 1):
                by_module.setdefault(name, []).append(key)
            else:
                self.materialised_keys.append(key)
        self._hooked = by_module
        self._hooks = {name: modules[name].register_forward_hook(self._hook(name, keys))
                       for name, keys in by_module.items()}
        self._fired: set[str] | None = None  # the hooked modules that ran, recorded on the first forward
        self._concatenated: dict[str, tuple[torch.Tensor, ...]] = {}  # Linear experts' factors side by side

    def stacked_factors(self, artifacts: Mapping[str, bytes]) -> dict[str, tuple[torch.Tensor, ...]]:
        """{key: (U, S, V)} stacked over the tasks, (K, out, r), (K, r), (K, in, r), or {key: (D,)}
        (K, n) for a dense expert, each checked against the other tasks' and the encoder's tensor."""
        params = dict(self.encoder.named_parameters())
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
            for key, parts in factors.items():
                target = params.get(key)
                if len(parts) == 1:
                    if target is None or target.dim() != 1 or target.shape != parts[0].shape:
                        raise CorruptArtifactError(f"{name}: tensor {key + '.D'!r}: no 1-D parameter of shape "
                                                   f"{list(parts[0].shape)} in the encoder")
                    continue
                u, _, v = parts
                if target is None or target.dim() < 2 or (target.shape[0], target[0].numel()) != (len(u), len(v)):
                    kind = "Linear weight" if target is None or target.dim() == 2 else "parameter"
                    raise CorruptArtifactError(f"{name}: tensor {key + '.U'!r}: no {kind} of shape "
                                               f"{[len(u), len(v)]} in the encoder")
            decoded.append(factors)
        stacked = {}
        for key in keys or []:
            shapes = [[list(part.shape) for part in d[key]] for d in decoded]
            entry = key + (".D" if len(shapes[0]) == 1 else ".U")
            for task, shape in zip(self.tasks, shapes):
                if shape != shapes[0]:
                    raise CorruptArtifactError(f"{experts_artifact(task)}: tensor {entry!r}: U, S, V of shapes "
                                               f"{shape}, {experts_artifact(self.tasks[0])} has {shapes[0]}")
            stacked[key] = tuple(torch.stack([d[key][i] for d in decoded]) for i in range(len(shapes[0])))
        return stacked

    def to(self, device: torch.device | str) -> "TwinMerged":
        """The encoders, router and the experts' factors on ``device``."""
        super().to(device)
        self.factors = {key: tuple(part.to(self.device) for part in parts) for key, parts in self.factors.items()}
        return self

    def _hook(self, name: str, keys: list[str]):
        """The forward hook of module ``name`` adding each sample's experts of ``keys``."""
        parts = {key.rpartition(".")[2]: key for key in keys}

        def hook(module, args, output):
            weights = self._weights
            if weights is None:
                return None
            if self._fired is not None:
                self._fired.add(name)
            h = args[0]
            if h.shape[0] != weights.shape[0]:
                if h.shape[0] != 1:
                    raise RuntimeError(f"twin-merging: {name} input batch {h.shape[0]} != routing batch "
                                       f"{weights.shape[0]}")
                # an input shared by the batch (BERT's position ids, (1, N)): per-sample outputs
                h = h.expand(weights.shape[0], *h.shape[1:])
                output = output.expand(weights.shape[0], *output.shape[1:])
            w = weights.to(output.device, torch.float32)
            if isinstance(module, CONVOLUTIONS):  # channels first: sum_k w_k conv(h, E_k) + sum_k w_k b_k
                delta = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
                if "weight" in parts:
                    U, S, V = self.factors[parts["weight"]]
                    experts = torch.einsum("kor,kr,kir->koi", U, S, V).reshape(len(U), *module.weight.shape)
                    per_task = torch.stack([module._conv_forward(h.float(), expert, None) for expert in experts], 1)
                    delta = delta + torch.einsum("bk,bk...->b...", w, per_task)
                if "bias" in parts:
                    delta = delta + (w @ self.factors[parts["bias"]][0]).reshape(*output.shape[:2], *[1] * (output.dim() - 2))
                return output + delta.to(output.dtype)
            flat_out = output.reshape(output.shape[0], -1, output.shape[-1])  # (B, N, out)
            delta = torch.zeros(flat_out.shape, dtype=torch.float32, device=output.device)
            if "weight" in parts and isinstance(module, nn.Linear):
                # every expert at once: x V_cat (in, K r), scaled per block by w_k S_k, times U_cat (K r, out)
                U_cat, S, V_cat = self.concatenated(parts["weight"])
                flat = h.reshape(h.shape[0], -1, h.shape[-1]).to(V_cat.dtype)  # (B, N, in)
                z = torch.matmul(flat, V_cat).mul_((w[:, :, None] * S[None]).reshape(len(w), 1, -1))
                delta.view(-1, delta.shape[-1]).addmm_(z.view(-1, z.shape[-1]), U_cat)  # accumulated in place
            elif "weight" in parts and isinstance(module, nn.Embedding):
                U, S, V = self.factors[parts["weight"]]  # (K, rows, r), (K, r), (K, dim, r)
                rows = U[:, h.reshape(h.shape[0], -1)] * S[:, None, None, :]  # (K, B, N, r)
                delta = delta + torch.einsum("kbnr,bk,kdr->bnd", rows, w, V)
            elif "weight" in parts:  # LayerNorm: LN_0(h) * sum_k w_k g_k
                normed = F.layer_norm(h.float(), module.normalized_shape, None, None, module.eps)
                normed = normed.reshape(flat_out.shape)
                delta = delta + normed * (w @ self.factors[parts["weight"]][0])[:, None, :]
            if "bias" in parts:
                delta = delta + (w @ self.factors[parts["bias"]][0])[:, None, :]
            return output + delta.reshape(output.shape).to(output.dtype)

        return hook

    def concatenated(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Linear expert's factors side by side, U_cat (K r, out), S (K, r), V_cat (in, K r), made
        once (again after ``to`` moves the factors), so that a hook applies the K experts with two
        matmuls instead of K pairs."""
        U, S, V = self.factors[key]
        cached = self._concatenated.get(key)
        if cached is None or cached[1] is not S:
            cached = (U.transpose(1, 2).reshape(-1, U.shape[1]).contiguous(), S,
                      V.permute(1, 0, 2).reshape(V.shape[1], -1).contiguous())
            self._concatenated[key] = cached
        return cached

    def expert_sum(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[k] E_k[key] as a dense tensor of the parameter's shape."""
        parts = self.factors[key]
        shape = self.encoder.get_parameter(key).shape
        if len(parts) == 1:
            return (weights @ parts[0]).reshape(shape)
        U, S, V = parts
        return torch.einsum("kor,kr,kir->oi", U, S * weights[:, None], V).reshape(shape)

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
        """One forward of the shared expert, each hooked module adding its inputs' experts;
        with experts on other tensors, one forward per sample with those materialised.
        The first forward checks that every hooked module ran: a module whose parameters a
        parent reads directly (``nn.MultiheadAttention``'s ``out_proj``, an embedding table
        read as ``.weight``) never calls its hook, so its experts move to materialisation and
        the batch is recomputed."""
        if self._fired is None and self._hooked:
            self._fired = set()
            try:
                output = self._compose(inputs, weights)
                silent = [name for name in self._hooked if name not in self._fired]
            finally:
                self._fired = None
            if not silent:
                self._hooked = {}  # checked: no need to record again
                return output
            for name in silent:
                self._hooks.pop(name).remove()
                self.materialised_keys.extend(self._hooked.pop(name))
            self.materialised_keys.sort()
            self._hooked = {}
        return self._compose(inputs, weights)

    def _compose(self, inputs: Mapping[str, Any], weights: torch.Tensor) -> torch.Tensor:
        try:
            if not self.materialised_keys:
                self._weights = weights
                return self.encoder(**inputs)
            outputs = []
            params = dict(self.encoder.named_parameters())
            for b in range(len(weights)):
                w = weights[b].to(self.device, torch.float32)
                composed = {key: (params[key].float() + self.expert_sum(key, w)).to(params[key].dtype)
                            for key in self.materialised_keys}
                sample = {name: value[b : b + 1] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                          for name, value in inputs.items()}
                self._weights = weights[b : b + 1]
                outputs.append(functional_call(self.encoder, composed, args=(), kwargs=sample, strict=False))
            return torch.cat(outputs)
        finally:
            self._weights = None


@register_method("twin-merging")
class TwinMerging(Method):
    hyperparameters = {
        "exemplars": Int(100, "N: unlabelled training inputs per task the router is trained on", 1),
        "rank_rule": Choice("ratio", ("ratio", "fixed"), "the experts' SVD rank: rank_ratio x the smaller "
                            "dimension (authors) or a fixed rank"),
        "rank_ratio": Float(0.1, "rank_rule ratio: r = int(ratio x min(rows, cols)), 1 - the authors' mask_rate",
                            0.0, 1.0, low_open=True),
        "rank": Int(16, "rank_rule fixed: r of each exclusive expert's truncated SVD", 1),
        "svd": Choice("randomized", ("randomized", "exact"), "the experts' truncated SVD: seeded randomized "
                      "(Halko et al.; rank-r error within 1.01x of the optimum measured) or exact float64"),
        "scope": Choice("all-2d", ("all-2d", "linear"), "tensors with experts: every merged tensor, 1-D dense "
                        "(authors) or nn.Linear weights only"),
        "shared": Hyperparameter("str", "task-arithmetic", "the shared expert: a static, exemplar-free method (e.g. ties)"),
        "shared_scaling": Float(0.3, "lambda of the shared expert's merge, where it has one", 0.0),
        "router_epochs": Int(10, "passes of the router's training over the N x K exemplar features", 0),
        "router_batch_size": Int(1024, "exemplar features in one router step (authors' Trainer batch)", 2),
        "router_lr": Float(1e-3, "Adam learning rate of the router", 0.0, low_open=True),
        "router_lr_decay": Bool(True, "decay the router's learning rate linearly to 0 (HF Trainer default)"),
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

    def expert_keys(self, pool: ModelPool) -> list[str]:
        """The merged tensors that get exclusive experts (``scope``)."""
        if self.hparams["scope"] == "linear":
            return linear_weight_keys(pool.backbone.build_encoder(), pool.merged_keys)
        return list(pool.merged_keys)

    def build(self, pool: ModelPool) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """The shared expert and the artifacts (shared state, per-task U/S/V factors or dense
        1-D experts). A tensor no task changes from the shared expert gets no expert."""
        rule, ratio, rank = self.hparams["rank_rule"], float(self.hparams["rank_ratio"]), int(self.hparams["rank"])
        shared = self.shared_state(pool)
        artifacts = {SHARED: encode_tensors(shared, {"content": SHARED_CONTENT})}
        factors: dict[str, dict[str, torch.Tensor]] = {task: {} for task in pool.tasks}
        for key in self.expert_keys(pool):
            deltas = [pool.finetuned(task, key).float() - shared[key].float() for task in pool.tasks]
            if all(torch.count_nonzero(delta) == 0 for delta in deltas):
                continue
            if deltas[0].dim() <= 1:
                for task, delta in zip(pool.tasks, deltas):
                    factors[task][f"{key}.D"] = delta.reshape(-1).contiguous()
                continue
            r = expert_rank(tuple(deltas[0].shape), rule, ratio, rank)
            if r == 0:
                continue
            for index, (task, delta) in enumerate(zip(pool.tasks, deltas)):
                u, s, v = svd_factors(delta.reshape(delta.shape[0], -1), r, self.hparams["svd"],
                                      svd_seed(self.seed, key, index))
                factors[task].update({f"{key}.U": u, f"{key}.S": s, f"{key}.V": v})
        for task in pool.tasks:
            artifacts[experts_artifact(task)] = encode_tensors(factors[task], {"content": EXPERTS_CONTENT, "task": task})
        return shared, artifacts

    def merge(self, pool, exemplars: Mapping[str, Any] | None = None):
        if not exemplars:
            raise ValueError("twin-merging needs exemplars to train its router")
        shared, artifacts = self.build(pool)
        features = self.router_training_features(pool, shared, exemplars)
        router = train_router(torch.cat(features), task_indices(features), len(pool.tasks),
                              int(self.hparams["router_epochs"]), int(self.hparams["router_batch_size"]),
                              float(self.hparams["router_lr"]), self.seed, bool(self.hparams["router_lr_decay"]),
                              device=getattr(self, "device", torch.device("cpu")))
        artifacts[ROUTER] = encode_router(router, pool.tasks)
        # inference reads the stored router
        return TwinMerged(pool, shared, artifacts, decode_router(artifacts[ROUTER], pool.tasks),
                          self.hparams["router_features"])

    def rebuild(self, pool, artifacts):
        missing = [name for name in (SHARED, ROUTER) if name not in artifacts]
        if missing:
            raise CorruptArtifactError(f"missing Twin-Merging artifact(s): {', '.join(missing)}")
        contents = decode_tensors(artifacts[SHARED], source=SHARED)
        contents.expect_content(SHARED_CONTENT)
        shared = {key: contents.dense(key) for key in contents}
        return TwinMerged(pool, shared, dict(artifacts), decode_router(artifacts[ROUTER], pool.tasks),
                          self.hparams["router_features"])

    def router_training_features(self, pool: ModelPool, shared: Mapping[str, torch.Tensor],
                                 exemplars: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per task, what the router reads from its exemplars (an encoder of its own on the
        run's device, freed before the merged model builds its encoders), as CPU float32."""
        state = shared if self.hparams["router_features"] == "shared" else pool.pretrained_state()
        device = getattr(self, "device", torch.device("cpu"))
        encoder = load_encoder(pool.backbone, state).to(device)
        return per_task_features(lambda **inputs: routing_input(pool.backbone, encoder(**inputs)), exemplars,
                                 pool.tasks, device, getattr(self, "precision", "fp32"))
