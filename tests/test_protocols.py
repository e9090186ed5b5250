"""Protocols: the tables resolve for every method, runs record their protocol and overrides,
old records stay readable and unlabelled, the leaderboard keeps protocols apart, and a
protocol's cap on test examples scores exactly the first N."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from mergebench.cli import main
from mergebench.errors import HyperparameterError, UnknownNameError
from mergebench.protocols import (ORIGINAL, PROTOCOLS, Protocol, Setting, check_protocol, get_protocol,
                                  resolve_hyperparameters)
from mergebench.registry import METHODS
from mergebench.results import load_results
from mergebench.runner import make_method, run
from mergebench.sweep import configuration_key, result_key
from mergebench.table import leaderboard_markdown
from tests.test_results import make_result


def cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


# --- the tables ------------------------------------------------------------------------------


def test_original_is_every_methods_defaults_with_a_source_for_each():
    for name, cls in METHODS.items():
        assert name in ORIGINAL.methods, f"original does not list method {name!r}"
        assert ORIGINAL.values(name) == cls.defaults(), name
        assert all(setting.source.strip() for setting in ORIGINAL.methods[name].values()), name
    assert set(ORIGINAL.methods) == set(METHODS.names())


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_every_protocol_resolves_for_every_method(protocol):
    chosen = get_protocol(protocol)
    check_protocol(chosen)
    for name, cls in METHODS.items():
        method = make_method(name, resolve_hyperparameters(chosen, name, None, cls.hyperparameters))
        expected = {**cls.defaults(), **{k: s.value for k, s in chosen.methods.get(name, {}).items()}}
        assert method.hparams == expected, (protocol, name)


def test_protocol_values_are_not_the_users_overrides():
    from mergebench.runner import resolve

    plan = resolve("flexswitch", "detr-r50")  # original sets loss=kl; on a detector the default becomes mse
    assert plan.method.overrides == {} and plan.overrides == ()
    assert plan.method.resolved_hyperparameters(plan.backbone_class)["loss"] == "mse"
    with pytest.raises(HyperparameterError, match="use loss=mse"):  # the user's own kl is refused before any work
        resolve("flexswitch", "detr-r50", hyperparameters={"loss": "kl"})
    explicit = resolve("flexswitch", "tiny-bert", hyperparameters={"loss": "kl"})
    assert explicit.method.overrides == {"loss": "kl"} and explicit.overrides == ("loss",)


def test_t_switch_table_5_values():
    table = get_protocol("t-switch-cvpr2025")
    assert table.values("ties") == {"keep": 0.5, "scaling": 0.3, "merge_func": "sum"}
    assert table.values("dare")["drop_rate"] == 0.5
    assert (table.values("regmean")["exemplars"], table.values("fisher")["exemplars"]) == (256, 4096)
    assert table.values("adamerging") == {"lr": 1e-3, "steps": 500}
    assert table.values("auto-switch")["routing"] == "per-batch"
    assert table.test_limit("glue") == 500 and table.test_limit("tiny") is None
    assert get_protocol("original").test_limit("glue") is None


@pytest.mark.parametrize("methods, error", [
    ({"ties": {"kep": Setting(0.5, "typo")}}, "has no such hyperparameter"),
    ({"ties": {"keep": Setting(1.5, "out of range")}}, r"keep=1\.5 is not allowed"),
    ({"no-such-method": {}}, "unknown method 'no-such-method'"),
])
def test_a_wrong_protocol_value_fails_its_check(methods, error):
    with pytest.raises((HyperparameterError, UnknownNameError), match=error):
        check_protocol(Protocol("broken", "a table with a mistake", methods))


@pytest.mark.parametrize("left_out, message", [
    (["markers-z"], "must name some, not all"),
    (["markers-a", "markers-b", "markers-c"], "must name some, not all"),
])
def test_a_bad_left_out_list_fails_its_check(left_out, message):
    with pytest.raises(HyperparameterError, match=message):
        check_protocol(Protocol("broken", "bad tasks", {}, left_out={"tiny": Setting(left_out, "test")}))


def test_a_protocol_that_leaves_a_task_out_neither_merges_nor_scores_it(tiny_bert):
    without = Protocol("without-c", "no markers-c", {}, left_out={"tiny": Setting(["markers-c"], "this test")})
    result = run("task-arithmetic", "tiny-bert", protocol=without, results_dir=None)
    assert list(result.metrics) == list(result.examples) == ["markers-a", "markers-b"]
    # the merge is of two task vectors: theta_pre + 0.3 (tau_a + tau_b), recomputed from the checkpoints
    from safetensors.torch import load_file

    from mergebench.runner import exemplars_for, load_pool, resolve, timed_merge

    plan = resolve("task-arithmetic", "tiny-bert", protocol=without)
    backbone = plan.make_backbone()
    with load_pool(backbone, plan.task_names(backbone)) as pool:
        merged, _ = timed_merge(plan.method, pool, exemplars_for(plan.method, backbone, pool.tasks, 0))
    pre = load_file(str(tiny_bert.pretrained_checkpoint()))
    tuned = {t: load_file(str(tiny_bert.finetuned_checkpoint(t))) for t in ("markers-a", "markers-b")}
    state = merged.encoder.state_dict()
    keys = [k for k in pool.merged_keys if pre[k].is_floating_point()]
    assert any(not torch.equal(tuned["markers-a"][k], pre[k]) for k in keys)
    for key in keys:
        expected = pre[key] + 0.3 * ((tuned["markers-a"][key] - pre[key]) + (tuned["markers-b"][key] - pre[key]))
        assert torch.allclose(state[key], expected, atol=1e-6), key


def test_a_bad_test_cap_fails_its_check():
    with pytest.raises(HyperparameterError, match=r"test_examples\['tiny'\] = 0"):
        check_protocol(Protocol("broken", "zero examples", {}, {"tiny": Setting(0, "none")}))


def test_unknown_protocol_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="valid protocols: original, t-switch-cvpr2025, auto-flexswitch-2026"):
        get_protocol("t-switch")


# --- runs through the command line ------------------------------------------------------------


@pytest.fixture(scope="module")
def protocol_runs(tiny_bert, tmp_path_factory):
    """ties on tiny-bert under t-switch-cvpr2025, as given and with one --hp over it."""
    results = tmp_path_factory.mktemp("results")
    base = ["run", "--method", "ties", "--backbone", "tiny-bert", "--protocol", "t-switch-cvpr2025",
            "--results-dir", str(results)]
    runs = [cli(base), cli([*base, "--hp", "scaling=0.4"])]
    records = [json.loads(line) for line in (results / "tiny-bert.jsonl").read_text().splitlines()]
    return {"runs": runs, "records": records, "dir": results}


def test_run_under_t_switch_protocol_records_its_values(protocol_runs):
    assert [code for code, _, _ in protocol_runs["runs"]] == [0, 0], protocol_runs["runs"]
    record = protocol_runs["records"][0]
    assert record["protocol"] == "t-switch-cvpr2025" and record["overrides"] == []
    assert record["hyperparameters"] == {"keep": 0.5, "merge_func": "sum", "scaling": 0.3}
    assert record["schema_version"] == 4
    assert record["examples"] == {"markers-a": 96, "markers-b": 96, "markers-c": 96}  # tiny's whole test splits
    assert record["batch_size"] == 256  # the protocol's evaluation batch (no --batch-size given)


def test_an_explicit_hp_is_recorded_as_an_override(protocol_runs):
    record = protocol_runs["records"][1]
    assert record["protocol"] == "t-switch-cvpr2025" and record["overrides"] == ["scaling"]
    assert record["hyperparameters"] == {"keep": 0.5, "merge_func": "sum", "scaling": 0.4}
    page = leaderboard_markdown(protocol_runs["dir"])
    assert "merge_func=sum, scaling=0.4* " in page and "merge_func=sum, scaling=0.3 " in page and "keep=0.5*" not in page


def test_unknown_protocol_on_the_command_line_names_the_valid_ones(tmp_path):
    code, _, err = cli(["run", "--method", "ties", "--backbone", "tiny-bert", "--protocol", "cvpr",
                        "--results-dir", str(tmp_path)])
    assert code == 2
    assert "unknown protocol 'cvpr'; valid protocols: original, t-switch-cvpr2025, auto-flexswitch-2026" in err
    assert not list(tmp_path.iterdir())


def test_list_protocol_prints_values_and_sources():
    code, out, _ = cli(["list", "--protocol", "t-switch-cvpr2025", "--method", "ties"])
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("ties ")}
    assert '"sum"' in rows["merge_func"] and "dis-sum" in rows["merge_func"]
    assert "0.5" in rows["keep"] and "Table 5" in rows["keep"]
    assert "glue" in out and "first 500" in out
    code, out, _ = cli(["list", "--protocol", "t-switch-cvpr2025", "--method", "emr-merging"])
    assert code == 0 and "emr-merging" not in out.split("Evaluation")[0].splitlines()[-1]


# --- records, keys and the leaderboard -------------------------------------------------------


def test_schema_3_records_load_and_show_no_protocol(tmp_path):
    old = json.loads(make_result().to_json())
    for key in ("protocol", "overrides", "examples"):
        del old[key]
    old["schema_version"] = 3
    new = json.loads(make_result(method="ties", hyperparameters={"keep": 0.5, "scaling": 0.3},
                                 protocol="t-switch-cvpr2025", overrides=["scaling"]).to_json())
    (tmp_path / "tiny-bert.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    loaded = load_results(tmp_path)
    assert [(r.protocol, r.overrides, r.examples) for r in loaded] == [(None, [], None),
                                                                       ("t-switch-cvpr2025", ["scaling"], None)]
    page = leaderboard_markdown(tmp_path)
    assert "### (no protocol recorded)" in page and "### Protocol: t-switch-cvpr2025" in page
    assert "### Protocol: original" not in page  # an old record is never labelled with a protocol


def test_a_version_4_record_must_name_its_protocol_field(tmp_path):
    record = {k: v for k, v in json.loads(make_result(protocol="original").to_json()).items() if k != "protocol"}
    (tmp_path / "tiny-bert.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(Exception, match="protocol: missing"):
        load_results(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"overrides": ["keep"]}, "overrides: keep not among the recorded hyperparameters"),
    ({"overrides": ["scaling", "scaling"]}, "names a hyperparameter twice"),
    ({"examples": {"markers-a": 5}}, "examples: .* is not an object of the metrics' tasks"),
    ({"examples": {"markers-a": 5, "markers-b": 0}}, "examples.markers-b: 0 is not a positive integer"),
    ({"protocol": ""}, "protocol: '' is not a non-empty string"),
])
def test_bad_protocol_fields_are_refused(changes, message):
    with pytest.raises(Exception, match=message):
        make_result(**changes).to_json()


def test_the_leaderboard_groups_rows_by_protocol(tmp_path):
    from mergebench.results import append_result

    append_result(tmp_path, make_result(average=0.9, protocol="original"))
    append_result(tmp_path, make_result(average=0.2, protocol="t-switch-cvpr2025"))
    append_result(tmp_path, make_result(method="auto-switch", average=0.7, protocol="t-switch-cvpr2025",
                                        hyperparameters={"alpha": 0.5, "routing": "per-batch"}, dynamic=True))
    page = leaderboard_markdown(tmp_path)
    original, tswitch = page.index("### Protocol: original"), page.index("### Protocol: t-switch-cvpr2025")
    assert original < tswitch
    assert PROTOCOLS["t-switch-cvpr2025"].description in page
    first, second = page[original:tswitch], page[tswitch:]
    assert "| 90.00 " in first and "| 20.00 " not in first  # each row only under its own protocol
    assert "| 20.00 " in second and "| 90.00 " not in second
    assert "| auto-switch (uses single-task batches) | no (batch) " in second
    # the same configuration under two protocols is two rows, never one replacing the other
    assert page.count("| task-arithmetic ") == 2


def test_per_batch_rows_name_their_batch_and_are_keyed_by_it():
    from mergebench.sweep import keyed_batch_size

    routed = {"alpha": 0.5, "routing": "per-batch"}
    result = make_result(method="auto-switch", hyperparameters=routed, dynamic=True, protocol="t-switch-cvpr2025",
                         batch_size=256)
    assert keyed_batch_size(routed, 256) == 256 and keyed_batch_size({"routing": "per-input"}, 256) is None
    assert result_key(result) != result_key(make_result(method="auto-switch", hyperparameters=routed, dynamic=True,
                                                        protocol="t-switch-cvpr2025", batch_size=64))
    assert result_key(make_result(batch_size=256)) == result_key(make_result(batch_size=64))  # no routing: same run
    from mergebench.table import results_table

    assert "auto-switch (uses single-task batches of 256)" in results_table([result])


def test_the_configuration_key_includes_the_protocol():
    args = ("ties", "tiny-bert", 0, {"keep": 0.5}, None, "fp32")
    keys = {configuration_key(*args, protocol=p) for p in (None, "original", "t-switch-cvpr2025")}
    assert len(keys) == 3
    result = make_result(protocol="t-switch-cvpr2025")
    assert result_key(result) == configuration_key(result.method, result.backbone, result.seed,
                                                   result.hyperparameters, None, "fp32", protocol="t-switch-cvpr2025")


# --- the cap on test examples ----------------------------------------------------------------


def test_a_test_cap_scores_exactly_the_first_n_examples(tiny_bert, tmp_path):
    cap = 37  # below tiny's 96 test examples per task, and not a multiple of the batch size
    capped = Protocol("capped", "the first 37 test examples", {}, {"tiny": Setting(cap, "this test")})
    result = run("pretrained", "tiny-bert", protocol=capped, batch_size=16, results_dir=tmp_path)
    assert result.protocol == "capped" and result.examples == {task: cap for task in result.metrics}
    assert result.batch_size == 16
    # independent: the pretrained encoder and each head over the split's first 37 examples, in one batch
    from safetensors.torch import load_file

    encoder = tiny_bert.build_encoder()
    encoder.load_state_dict(load_file(str(tiny_bert.pretrained_checkpoint())))
    encoder.eval()
    for task in tiny_bert.tasks:
        inputs, targets = next(iter(task.data.batches(task.name, "test", 1000)))
        assert len(targets) > cap
        first = {key: value[:cap] for key, value in inputs.items()}
        with torch.no_grad():
            predicted = task.head()(encoder(**first)).argmax(-1)
        assert result.metrics[task.name] == pytest.approx((predicted == targets[:cap]).sum().item() / cap, abs=1e-12)
    full = run("pretrained", "tiny-bert", results_dir=None)
    assert full.protocol == "original" and set(full.examples.values()) == {96} and full.batch_size == 64


def test_the_readme_table_of_differences_is_the_protocols():
    from pathlib import Path

    from mergebench.protocols import differences, differences_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert differences_markdown() in readme
    rows = {(method, name): chosen for method, name, chosen in differences()}
    assert rows[("ties", "merge_func")][1].value == "sum" and rows[("ties", "merge_func")][0].value == "mean"
    assert ("task-arithmetic", "scaling") not in rows  # 0.3 under every protocol: not a difference


def test_old_records_get_todays_defaults_only_while_the_method_still_declares_what_they_name():
    from mergebench.table import latest_per_configuration

    old_ties = make_result(method="ties", hyperparameters={"keep": 0.2, "scaling": 0.3})
    old_twin = make_result(method="twin-merging", hyperparameters={"rank": 16, "router_steps": 500}, dynamic=True)
    shown = {r.method: r.hyperparameters for r in latest_per_configuration([old_ties, old_twin])}
    assert shown["ties"] == {**METHODS.get("ties").defaults(), "keep": 0.2, "scaling": 0.3}
    assert shown["twin-merging"] == {"rank": 16, "router_steps": 500}  # router_steps is gone: nothing filled in


def test_a_sweep_takes_protocols_as_one_more_axis_and_its_grid_overrides_them(tiny_bert):
    from mergebench.sweep import plan_sweep

    both = plan_sweep(["ties"], ["tiny-bert"], [0], {}, protocols=["original", "t-switch-cvpr2025"])
    assert [c.plan.protocol.name for c in both] == ["original", "t-switch-cvpr2025"]
    assert [c.hyperparameters["merge_func"] for c in both] == ["mean", "sum"]
    assert len({c.key for c in both}) == 2 and "protocol t-switch-cvpr2025" in both[1].label
    (tuned,) = plan_sweep(["ties"], ["tiny-bert"], [0], {"scaling": [0.4]}, protocols=["t-switch-cvpr2025"])
    assert tuned.plan.overrides == ("scaling",)
    assert tuned.hyperparameters == {"keep": 0.5, "scaling": 0.4, "merge_func": "sum"}
    with pytest.raises(UnknownNameError, match="valid protocols"):
        plan_sweep(["ties"], ["tiny-bert"], [0], {}, protocols=["cvpr"])
