"""T-Switch / Auto-Switch against the paper's equations on hand-sized cases, and
the dynamic inference engine's grouping and caching."""
import math

import pytest
import torch

from mergebench.dynamic import ComposedMerged, KNNRouter
from mergebench.method import load_encoder
from mergebench.methods.t_switch import encode_switches
from mergebench.sparsify import pulse_mask
from mergebench.switches import SwitchStore
from mergebench.runner import make_method
from tests._stub import finetuned_from, make_pool, tensors

PRE = tensors(a=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], b=[0.0, 0.0])
TAU1 = tensors(a=[3.0, 1.0, 2.0, -1.0, -4.0, -0.5, 0.0], b=[0.5, -0.25])
TAU2 = tensors(a=[-1.0, 2.0, 0.0, 0.0, 1.0, 1.0, -2.0], b=[0.0, 0.0])  # b unchanged: stores nothing


def finetuned(*taus):
    return finetuned_from(PRE, *taus)


@pytest.fixture
def pool(tmp_path):
    with make_pool(tmp_path, PRE, finetuned(TAU1, TAU2)) as pool:
        yield pool


def test_pulse_mask_drops_smallest_alpha_fraction_per_sign():
    # positives 3,1,2: drop the smallest one (1); negatives -1,-4,-0.5: drop -0.5; zero never kept
    mask = pulse_mask(TAU1["a"], 0.5)
    assert mask.tolist() == [True, False, True, True, True, False, False]


def test_pulse_mask_alpha_zero_keeps_every_nonzero_entry():
    assert torch.equal(pulse_mask(TAU1["a"], 0.0), TAU1["a"] != 0)


def test_switch_is_beta_times_mask_times_sign_eq3(pool):
    artifacts = encode_switches(pool, alpha=0.5)
    store = SwitchStore(pool.tasks, artifacts)
    kept = torch.tensor([3.0, 2.0, -1.0, -4.0])
    beta = math.sqrt((kept**2).sum()) / math.sqrt(4)  # ||tau (.) A||_2 / ||A (.) P||_2
    expected = beta * torch.tensor([1.0, 0.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    assert torch.allclose(store.combine("a", torch.tensor([1.0, 0.0])), expected)


def test_alpha_zero_one_bit_switch_equals_eq3_on_the_whole_task_vector(pool):
    store = SwitchStore(pool.tasks, encode_switches(pool, alpha=0.0))
    tau = TAU1["a"]
    beta = tau.norm() / math.sqrt(int((tau != 0).sum()))
    assert torch.allclose(store.combine("a", torch.tensor([1.0, 0.0])), beta * torch.sign(tau))


def test_unchanged_tensors_store_nothing_and_combine_to_zero(pool):
    store = SwitchStore(pool.tasks, encode_switches(pool, alpha=0.5))
    assert torch.equal(store.combine("b", torch.tensor([0.0, 1.0])), torch.zeros(2))


def test_t_switch_predicts_with_theta_plus_its_own_switch(pool):
    merged = make_method("t-switch", {"alpha": 0.5}).merge(pool)
    x = {"x": torch.ones(1)}
    for k, task in enumerate(pool.tasks):
        weights = torch.zeros(2)
        weights[k] = 1.0
        params = merged.merged_parameters(weights)
        expected = sum(p.sum() for p in params.values())
        assert torch.allclose(merged.predict(task, x), expected.reshape(1))
    # storage is the bytes of the two artifacts
    assert merged.storage_bytes() == sum(len(a) for a in merged.artifacts().values()) > 0


def test_knn_router_weights_are_neighbour_fractions():
    queries = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1]])
    owners = torch.tensor([0, 0, 0, 1, 1])
    router = KNNRouter(lambda inputs: inputs["f"], queries, owners, num_tasks=2, neighbours=4)
    weights = router({"f": torch.tensor([[0.05], [9.0]])})
    assert torch.allclose(weights, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))


def test_knn_router_rejects_more_neighbours_than_queries():
    with pytest.raises(ValueError, match="neighbours"):
        KNNRouter(lambda i: i, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 1, neighbours=4)


def test_dynamic_inference_groups_inputs_and_caches_weights(pool):
    store = SwitchStore(pool.tasks, encode_switches(pool, alpha=0.5))
    rows = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    encoder = load_encoder(pool.backbone, pool.pretrained_state())
    merged = ComposedMerged(pool.backbone, encoder, store, router=lambda inputs: rows)
    x = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    out = merged.predict("t1", x)
    assert merged.materialisations == 2  # two distinct weight vectors, not four samples
    for i in range(4):
        params = merged.merged_parameters(rows[i])
        assert torch.allclose(out[i], sum(p.sum() for p in params.values()) * x["x"][i])
    merged.predict("t1", x)
    assert merged.materialisations == 2  # served from the cache
    merged.clear_cache()
    assert torch.equal(merged.predict("t1", x), out)
    assert merged.materialisations == 4  # built again after the cache was cleared


def test_routed_model_reports_what_was_learned_stored_and_routed(pool):
    store = SwitchStore(pool.tasks, encode_switches(pool, alpha=0.5))
    encoder = load_encoder(pool.backbone, pool.pretrained_state())
    routed = ComposedMerged(pool.backbone, encoder, store, router=lambda inputs: torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                            artifacts={"parts.mbc": b"abc"}, diagnostics={"learned": [1, 2]})
    routed.predict("t1", {"x": torch.ones(2)})
    assert routed.diagnostics() == {"learned": [1, 2], "artifact_bytes": {"parts.mbc": 3},
                                    "routing_accuracy": {"t1": 0.5}, "routing_accuracy_mean": 0.5}
    assert routed.artifacts() == {"parts.mbc": b"abc"} and routed.storage_bytes() == 3
    oracle = ComposedMerged(pool.backbone, encoder, store)  # no router: one-hot on the task evaluated
    assert torch.equal(oracle.routing_weights("t2", {"x": torch.ones(3)}), torch.tensor([[0.0, 1.0]] * 3))
    oracle.predict("t2", {"x": torch.ones(3)})
    assert oracle.diagnostics() == {}


def test_auto_switch_routes_each_task_to_itself_on_separable_features(pool):
    exemplars = {"t1": {"x": torch.full((12,), -1.0)}, "t2": {"x": torch.full((12,), 1.0)}}
    merged = make_method("auto-switch", {"exemplars": 12, "neighbours": 5}).merge(pool, exemplars)
    weights = merged.routing_weights("t1", {"x": torch.tensor([-1.0, 1.0])})
    assert torch.equal(weights, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert "query_set.mbc" in merged.artifacts()


def test_auto_switch_needs_exemplars(pool):
    with pytest.raises(ValueError, match="exemplars"):
        make_method("auto-switch").merge(pool, None)


def test_auto_switch_averaged_query_model_routes_too(pool):
    exemplars = {"t1": {"x": torch.full((12,), -1.0)}, "t2": {"x": torch.full((12,), 1.0)}}
    merged = make_method("auto-switch", {"exemplars": 12, "neighbours": 5, "query_model": "averaged"}).merge(pool, exemplars)
    weights = merged.routing_weights("t1", {"x": torch.tensor([-1.0, 1.0])})
    assert torch.equal(weights, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="query_model"):
        make_method("auto-switch", {"query_model": "other"}).merge(pool, exemplars)


def test_corrupt_switch_artifact_names_the_task_file(pool):
    from mergebench.codecs import CorruptArtifactError

    artifacts = encode_switches(pool, alpha=0.5)
    damaged = bytearray(artifacts["t2.tswitch"])
    damaged[-1] ^= 0xFF
    artifacts["t2.tswitch"] = bytes(damaged)
    with pytest.raises(CorruptArtifactError, match="t2.tswitch"):
        SwitchStore(pool.tasks, artifacts)


def test_switch_artifacts_of_mismatched_shapes_are_refused(pool):
    from mergebench.codecs import CorruptArtifactError, encode_tensors, tswitch_from_task_vector

    artifacts = encode_switches(pool, alpha=0.5)
    artifacts["t2.tswitch"] = encode_tensors({"a": tswitch_from_task_vector(torch.ones(3), torch.ones(3, dtype=torch.bool))})
    with pytest.raises(CorruptArtifactError, match="t2.tswitch.*'a'"):
        SwitchStore(pool.tasks, artifacts)


def test_routing_accuracy_is_recorded_during_prediction(pool):
    exemplars = {"t1": {"x": torch.full((12,), -1.0)}, "t2": {"x": torch.full((12,), 1.0)}}
    merged = make_method("auto-switch", {"exemplars": 12, "neighbours": 5}).merge(pool, exemplars)
    merged.predict("t1", {"x": torch.tensor([-1.0, -1.0, 1.0, -1.0])})  # one of four routed to t2
    merged.predict("t2", {"x": torch.tensor([1.0, 1.0])})
    diagnostics = merged.diagnostics()
    assert diagnostics["routing_accuracy"] == {"t1": 0.75, "t2": 1.0}
    assert diagnostics["routing_accuracy_mean"] == 0.875


def test_auto_switch_query_set_is_a_checked_container_the_router_reads(pool):
    from mergebench.codecs import CorruptArtifactError
    from mergebench.container import decode_tensors
    from mergebench.methods.t_switch import decode_query_set

    exemplars = {"t1": {"x": torch.full((12,), -1.0)}, "t2": {"x": torch.full((12,), 1.0)}}
    merged = make_method("auto-switch", {"exemplars": 12, "neighbours": 5}).merge(pool, exemplars)
    stored = merged.artifacts()["query_set.mbc"]
    contents = decode_tensors(stored)
    assert contents.metadata == {"content": "auto-switch/query-set", "tasks": ["t1", "t2"]}
    features, owners = decode_query_set(stored, pool.tasks)
    assert torch.equal(merged.router.queries, features.reshape(len(features), -1))
    assert torch.equal(merged.router.owners, owners) and owners.tolist() == [0] * 12 + [1] * 12
    damaged = bytearray(stored)
    damaged[-1] ^= 0x80  # in the owners payload
    with pytest.raises(CorruptArtifactError, match=r"query_set\.mbc: tensor 'owners': payload checksum mismatch"):
        decode_query_set(bytes(damaged), pool.tasks)
    with pytest.raises(CorruptArtifactError, match=r"query_set\.mbc: truncated"):
        decode_query_set(stored[:-5], pool.tasks)
    with pytest.raises(CorruptArtifactError, match=r"query_set\.mbc: holds None"):  # a switch file in its place
        decode_query_set(merged.artifacts()["t1.tswitch"], pool.tasks)
