"""T-Switch and Auto-Switch (Qi et al., "Less is More: Efficient Model Merging with
Binary Task Switch", CVPR 2025; Auto-FlexSwitch 2026 §III-B, Eqs. 2-5).

Per merged tensor l of task k, the task vector tau is replaced by three switches:
* activation switch A (P-Spar, Eq. 2): keep the positive entries above the
  alpha-quantile of the positive entries and the negative entries below the
  alpha-quantile of the negative ones, i.e. drop the alpha fraction of smallest
  magnitudes on each side separately;
* polarity switch P = sign(tau) with 0 -> -1 (Eq. 4);
* knob beta = ||tau (.) A||_2 / ||A (.) P||_2 (Eq. 3).
T-Switch uses the task identity: theta_k = theta + beta_k A_k (.) P_k.
Auto-Switch routes per input: w_k(x) = |Q_k ∩ N_x| / C over the C nearest query
features (Eq. 5), the query set Q_k holding the pretrained encoder's features of
N unlabelled exemplars of task k (``Task.routing_features``; for a detector, one
vector per object query, aggregated per image by majority vote: ``KNNRouter``).
``routing`` "per-batch" instead averages the k-NN weights over each batch and composes
once per batch, as the T-Switch authors' released code does on single-task test batches
of 256: close to an oracle, not an automatic method in deployment
(``mergebench.dynamic.RoutedMerged``).

Switched tensors: every floating-point tensor of the encoder whose fine-tuned value
differs from the pretrained one (identical tensors, e.g. embeddings frozen during
fine-tuning, have no task vector and store nothing). Each task's switches are
written as one artifact in the bit-packed ``tswitch`` format of
``mergebench.codecs``, in the container of ``mergebench.container``; Auto-Switch's
query set is a dense fp32 entry of the same container. Inference decodes exactly
those bytes.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from mergebench.codecs import FORMATS, tswitch_from_task_vector
from mergebench.container import decode_tensors, encode_tensors
from mergebench.dynamic import ROUTING_MODES, ComposedMerged, KNNRouter
from mergebench.errors import CorruptArtifactError
from mergebench.exemplars import per_task_features, task_indices
from mergebench.hyperparameters import Choice, Float, Int
from mergebench.method import Method, load_encoder
from mergebench.pool import ModelPool
from mergebench.registry import register_method
from mergebench.sparsify import pulse_mask
from mergebench.switches import SwitchStore
from mergebench.task import routing_view


def encode_switches(pool: ModelPool, alpha: float, fmt: str = "tswitch") -> dict[str, bytes]:
    """One artifact per task: mask, signs of the kept entries and beta, laid out as
    ``fmt`` ("tswitch": bit-packed mask + signs; "sass": grouped COO with 1-bit values,
    the unified format of the FlexSwitch paper's Fig. 8; "indep")."""
    artifacts = {}
    for task in tqdm(pool.tasks, desc="t-switch: encoding", unit="task", leave=False):
        switches = {}
        for key in pool.merged_keys:
            tau = pool.task_vector(task, key)
            if torch.count_nonzero(tau) == 0:
                continue
            switches[key] = tswitch_from_task_vector(tau, pulse_mask(tau, alpha), fmt=fmt)
        artifacts[f"{task}.tswitch"] = encode_tensors(switches)
    return artifacts


QUERY_SET = "query_set.mbc"
QUERY_SET_CONTENT = "auto-switch/query-set"


def encode_query_set(features: torch.Tensor, owners: torch.Tensor, tasks: list[str]) -> bytes:
    """The query set Q_k of every task: fp32 features (one row, or one (T, D) block, per
    exemplar) and the index of the task each row belongs to."""
    return encode_tensors({"features": features.float().contiguous(), "owners": owners.long()},
                          {"content": QUERY_SET_CONTENT, "tasks": list(tasks)})


def decode_query_set(data: bytes, tasks: list[str], name: str = QUERY_SET) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, owners) of a stored query set, checked against the pool's tasks."""
    contents = decode_tensors(data, source=name)
    contents.expect_content(QUERY_SET_CONTENT)
    if contents.metadata.get("tasks") != list(tasks):
        raise contents.error(f"built for tasks {contents.metadata.get('tasks')}, the pool has {list(tasks)}")
    features = contents.dense("features", torch.float32)
    owners = contents.dense("owners", torch.int64, (len(features),))
    if len(owners) and (int(owners.min()) < 0 or int(owners.max()) >= len(tasks)):
        raise contents.error(f"task indices outside 0..{len(tasks) - 1}", "owners")
    return features, owners


@register_method("t-switch")
class TSwitch(Method):
    # format: the storage layout of the switches (the values are the same in every layout)
    hyperparameters = {
        "alpha": Float(0.5, "alpha: the fraction of smallest-magnitude entries deactivated per tensor", 0.0, 1.0, high_open=True),
        "format": Choice("tswitch", FORMATS, "the storage layout of the switches (same values in every layout)"),
    }
    uses_task_identity = True
    dynamic = True

    def merge(self, pool, exemplars=None):
        return self.rebuild(pool, encode_switches(pool, float(self.hparams["alpha"]), str(self.hparams["format"])))

    def rebuild(self, pool, artifacts):
        encoder = load_encoder(pool.backbone, pool.pretrained_state())
        return ComposedMerged(pool.backbone, encoder, SwitchStore(pool.tasks, artifacts), artifacts=artifacts)


@register_method("auto-switch")
class AutoSwitch(Method):
    # N = 100 exemplars per task (the papers' exemplar-set size), C = 10 neighbours (best in their ablation).
    # query_model: "averaged" (default), the CVPR paper's choice (§3.3): features under
    # theta + (1/K) sum_k tau_hat_k, which it found makes tasks easier to tell apart; or
    # "pretrained", the plain encoder as Auto-FlexSwitch's Eq. 5 routes.
    hyperparameters = {
        "alpha": Float(0.5, "alpha: the fraction of smallest-magnitude entries deactivated per tensor", 0.0, 1.0, high_open=True),
        "exemplars": Int(100, "N: unlabelled training inputs per task in its query set", 1),
        "neighbours": Int(10, "C: nearest query features that vote for the task weights", 1),
        "query_model": Choice("averaged", ("averaged", "pretrained"),
                              "features of the query set: pretrained encoder or the averaged switches"),
        "routing": Choice("per-input", ROUTING_MODES, "per-input: each input its own k-NN weights (Eq. 8); "
                          "per-batch: their batch mean (authors' code; uses single-task batches)"),
    }
    needs_exemplars = True
    dynamic = True

    def merge(self, pool, exemplars: Mapping[str, Any] | None = None):
        if not exemplars:
            raise ValueError("auto-switch needs exemplars to build its query sets")
        artifacts = encode_switches(pool, float(self.hparams["alpha"]))
        encoder = load_encoder(pool.backbone, pool.pretrained_state())
        store = SwitchStore(pool.tasks, artifacts)
        extract = self.extractor(encoder, store)
        routed = routing_view(pool.backbone.tasks).routing_features
        encoder.to(self.device)  # the query features run on the run's device; the Merged starts on the CPU
        queries = [routed(features) for features in per_task_features(extract, exemplars, pool.tasks, self.device,
                                                                     self.precision)]
        encoder.to("cpu")
        # the query features are stored beside the switches, and the router reads them back from there
        artifacts[QUERY_SET] = encode_query_set(torch.cat(queries), task_indices(queries), pool.tasks)
        return self.compose(pool.backbone, encoder, store, artifacts)

    def rebuild(self, pool, artifacts):
        encoder = load_encoder(pool.backbone, pool.pretrained_state())
        return self.compose(pool.backbone, encoder, SwitchStore(pool.tasks, artifacts), dict(artifacts))

    def extractor(self, encoder, store: SwitchStore):
        """f_ex: the encoder whose features fill the query set and route each input."""
        if self.hparams["query_model"] == "pretrained":
            return encoder  # f_ex(x; Theta)
        uniform = torch.full((len(store.tasks),), 1.0 / len(store.tasks))
        state = encoder.state_dict()
        averaged = {key: state[key] + store.combine(key, uniform) for key in store.keys()}

        def extract(**inputs):
            device = next(encoder.parameters()).device  # the averaged weights follow the encoder's device
            if any(value.device != device for value in averaged.values()):
                averaged.update({key: value.to(device) for key, value in averaged.items()})
            return functional_call(encoder, averaged, args=(), kwargs=inputs)

        return extract

    def compose(self, backbone, encoder, store: SwitchStore, artifacts: dict[str, bytes]) -> ComposedMerged:
        """The switches composed per input by the k-NN router over the stored query set."""
        if QUERY_SET not in artifacts:
            raise CorruptArtifactError(f"missing Auto-Switch artifact {QUERY_SET}")
        extract = self.extractor(encoder, store)
        routing = routing_view(backbone.tasks)  # e.g. DETR: one vector per object query, majority vote
        routed = routing.routing_features
        queries, owners = decode_query_set(artifacts[QUERY_SET], store.tasks)
        router = KNNRouter(lambda inputs: routed(extract(**inputs)), queries, owners, len(store.tasks),
                           int(self.hparams["neighbours"]), by_parts=routing.routes_by_parts)
        return ComposedMerged(backbone, encoder, store, router=router, artifacts=artifacts,
                              routing=self.hparams["routing"])
