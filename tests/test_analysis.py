"""The analyses of mergebench.analysis: the controls' masks and the binary
approximation on hand-sized tensors, the evaluation probe and the reports on the
tiny-bert backbone (a few test examples per task)."""
import json
import math

import pytest
import torch

from mergebench.analysis import AnalysisOptions, run_analysis
from mergebench.analysis.edits import Edit, binary_approximation, keep_low_mask, random_mask
from mergebench.analysis.groups import groups_of, in_group, tensor_layer, tensor_type
from mergebench.analysis.probe import EditedTaskVectors, FirstTestExamples, Prober
from mergebench.cli import main
from mergebench.method import StaticMerged
from mergebench.pool import ModelPool
from mergebench.sparsify import pulse_mask

TAU = torch.tensor([3.0, 1.0, 2.0, -1.0, -4.0, -0.5, 0.0, 0.25, -2.0, 5.0])


# --------------------------------------------------------------------------- edits


def test_c2_prunes_the_largest_magnitudes_and_keeps_the_low_ones():
    tau = torch.tensor([3.0, 1.0, 2.0, 4.0, -1.0, -4.0, -0.5, -2.0, 0.0])
    low = keep_low_mask(tau, 0.25)  # of each sign, the largest quarter goes: 4.0 and -4.0
    assert Edit("keep-low", 0.25).apply("t", "k", tau).tolist() == [3.0, 1.0, 2.0, 0, -1.0, 0, -0.5, -2.0, 0]
    for side in (tau > 0, tau < 0):  # every surviving magnitude is below every pruned one
        assert tau[side & low].abs().max() < tau[side & ~low].abs().min()
    assert torch.equal(low, ~pulse_mask(tau, 0.75))  # the complement of P-Spar at 1 - alpha
    assert torch.equal(keep_low_mask(TAU, 0.9), ~pulse_mask(TAU, 0.1))  # (1 - 0.9 is not 0.1 in floats)
    assert torch.equal(Edit("keep-low", 0.0).apply("t", "k", TAU), TAU)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_c1_and_c2_prune_the_same_fraction(alpha):
    tau = torch.randn(10_000)
    high, low = pulse_mask(tau, alpha), keep_low_mask(tau, alpha)
    assert abs(int(high.sum()) - round((1 - alpha) * 10_000)) <= 2
    assert abs(int(low.sum()) - round((1 - alpha) * 10_000)) <= 2
    assert tau[low].abs().mean() < tau[high].abs().mean()


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_c3_keeps_the_right_fraction_at_random(alpha):
    tau = torch.randn(1000)
    mask = random_mask(tau, alpha, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == round((1 - alpha) * 1000)
    edit = Edit("random", alpha, seed=1)
    assert torch.equal(edit.apply("t", "k", tau), edit.apply("t", "k", tau))  # seeded per task and tensor
    if alpha:
        assert not torch.equal(edit.apply("t", "k", tau), Edit("random", alpha, seed=2).apply("t", "k", tau))
        assert not torch.equal(edit.apply("t", "k", tau), edit.apply("other-task", "k", tau))


def test_c3_rescale_divides_survivors_by_one_minus_alpha():
    tau = torch.randn(100)
    plain, rescaled = Edit("random", 0.75).apply("t", "k", tau), Edit("random", 0.75, rescale=True).apply("t", "k", tau)
    assert torch.allclose(rescaled, plain * 4)


def test_binary_approximation_is_eq3_and_eta_scales_the_knob():
    mask = pulse_mask(TAU, 0.5)
    beta = float(TAU[mask].norm() / math.sqrt(int(mask.sum())))  # ||tau (.) A||_2 / ||A (.) P||_2
    expected = beta * torch.sign(TAU) * mask
    assert torch.allclose(binary_approximation(TAU, 0.5), expected)
    assert torch.allclose(binary_approximation(TAU, 0.5, eta=1.0), Edit("binary", 0.5).apply("t", "k", TAU))
    assert torch.allclose(Edit("binary", 0.5, eta=0.3).apply("t", "k", TAU), 0.3 * expected)
    # alpha = 0 (Exp II / III): every non-zero entry binarised with one knob for the whole tensor
    full_beta = float(TAU.norm() / math.sqrt(int((TAU != 0).sum())))
    assert torch.allclose(binary_approximation(TAU, 0.0), full_beta * torch.sign(TAU))


def test_edit_specs_are_distinct_and_groups_leave_other_tensors_whole():
    edits = [Edit("full"), Edit("pretrained"), Edit("keep-high", 0.5), Edit("keep-low", 0.5), Edit("random", 0.5),
             Edit("random", 0.5, seed=1), Edit("random", 0.5, rescale=True), Edit("binary", 0.5),
             Edit("binary", 0.0, eta=2.0), Edit("keep-high", 0.5, group="type:query")]
    assert len({e.spec() for e in edits}) == len(edits)
    edit = Edit("keep-high", 0.9, group="layer:1")
    assert torch.equal(edit.apply("t", "model.encoder.layer.0.output.dense.weight", TAU), TAU)
    assert torch.equal(edit.apply("t", "model.encoder.layer.1.output.dense.weight", TAU), TAU * pulse_mask(TAU, 0.9))
    with pytest.raises(ValueError, match="unknown edit"):
        Edit("halve")
    with pytest.raises(ValueError, match="alpha"):
        Edit("keep-high", 1.0)


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("key, kind, layer", [
    ("model.encoder.layer.3.attention.self.query.weight", "query", 3),
    ("model.encoder.layer.3.attention.self.key.bias", "bias", 3),
    ("model.encoder.layer.0.attention.output.dense.weight", "attn-out", 0),
    ("model.encoder.layer.5.attention.output.LayerNorm.weight", "layernorm", 5),
    ("model.encoder.layer.5.intermediate.dense.weight", "ffn-in", 5),
    ("model.encoder.layer.5.output.dense.weight", "ffn-out", 5),
    ("model.embeddings.position_embeddings.weight", "embeddings", None),
    ("vision_model.encoder.layers.11.self_attn.v_proj.weight", "value", 11),  # CLIP vision tower names
    ("vision_model.encoder.layers.2.self_attn.out_proj.weight", "attn-out", 2),
    ("vision_model.encoder.layers.2.mlp.fc1.weight", "ffn-in", 2),
    ("vision_model.encoder.layers.2.mlp.fc2.weight", "ffn-out", 2),
    ("vision_model.encoder.layers.2.layer_norm1.bias", "layernorm", 2),
    ("vision_model.pre_layrnorm.weight", "layernorm", None),
])
def test_tensor_type_and_layer(key, kind, layer):
    assert tensor_type(key) == kind
    assert tensor_layer(key) == layer
    assert in_group(key, f"type:{kind}")


def test_groups_of_lists_types_then_layers():
    keys = ["m.layer.0.attention.self.query.weight", "m.layer.1.output.dense.weight", "m.embeddings.LayerNorm.bias"]
    assert groups_of(keys) == ["type:layernorm", "type:query", "type:ffn-out", "layer:0", "layer:1"]
    with pytest.raises(ValueError, match="unknown tensor group"):
        in_group("x", "module:query")


# --------------------------------------------------------------------------- probe


def test_full_and_pretrained_edits_reproduce_the_individual_and_pretrained_models(tiny_bert):
    with ModelPool(tiny_bert) as pool:
        task = pool.tasks[1]
        inputs, _ = next(tiny_bert.task(task).batches("test", 16))
        individual = StaticMerged(tiny_bert, pool.finetuned_state(task)).predict(task, inputs)
        pretrained = StaticMerged(tiny_bert, pool.pretrained_state()).predict(task, inputs)
        assert torch.allclose(EditedTaskVectors(pool, Edit("full")).predict(task, inputs), individual, atol=1e-5)
        assert torch.allclose(EditedTaskVectors(pool, Edit("pretrained")).predict(task, inputs), pretrained, atol=1e-5)
        pruned = EditedTaskVectors(pool, Edit("keep-high", 0.9)).predict(task, inputs)
        assert not torch.allclose(pruned, individual, atol=1e-5)


def test_first_test_examples_cuts_every_task_at_n(tiny_bert):
    tasks = {task.name: task for task in FirstTestExamples.of(tiny_bert.tasks, 20)}
    for task in ("markers-a", "markers-c"):
        batches = list(tasks[task].batches("test", 8))
        assert sum(len(labels) for _, labels in batches) == 20
        assert all(len(labels) == inputs["input_ids"].shape[0] for inputs, labels in batches)
    assert tasks["markers-a"].metric == "accuracy"  # everything else is the task's own
    assert tasks["markers-a"].classes == tiny_bert.task("markers-a").classes
    with pytest.raises(ValueError, match="--examples"):
        FirstTestExamples(tiny_bert.task("markers-a").data, 0)


def test_prober_caches_points(tiny_bert, tmp_path):
    prober = Prober(tiny_bert, examples=16, cache=tmp_path / "points.json")
    first = prober.run([Edit("full"), Edit("keep-high", 0.5)])
    assert prober.evaluated == 2
    again = Prober(tiny_bert, examples=16, cache=tmp_path / "points.json")
    assert again.run([Edit("keep-high", 0.5), Edit("full")]) == first
    assert again.evaluated == 0
    other = Prober(tiny_bert, examples=8, cache=tmp_path / "points.json")  # another sample size: new points
    other.run([Edit("full")])
    assert other.evaluated == 1


# --------------------------------------------------------------------------- reports


def test_pulse_report_on_tiny_bert(tiny_bert, tmp_path):
    options = AnalysisOptions(output_dir=tmp_path, examples=16, alphas=(0.3, 0.8), seeds=2, plot=False,
                              command="mergebench analyze pulse")
    written = run_analysis("pulse", tiny_bert, options)
    assert {p.name for p in written} == {"pulse.md", "pulse.json"}
    raw = json.loads((tmp_path / "pulse.json").read_text())
    assert set(raw["controls"]) == {"C1", "C2", "C3"}
    assert len(raw["controls"]["C3"]["0.3"]["markers-a"]) == 2  # one value per seed
    assert raw["ordering"]["cells"] == 2 * 3
    text = (tmp_path / "pulse.md").read_text()
    assert "`mergebench analyze pulse`" in text and "| C2 " in text and "pulse.png" not in text


def test_sensitivity_report_covers_groups_and_etas(tiny_bert, tmp_path):
    options = AnalysisOptions(output_dir=tmp_path, examples=8, etas=(0.5, 1.0), plot=False)
    run_analysis("sensitivity", tiny_bert, options)
    raw = json.loads((tmp_path / "sensitivity.json").read_text())
    assert {"type:query", "type:ffn-in", "layer:0", "layer:1"} <= set(raw["exp1"]) == set(raw["exp2"])
    assert set(raw["exp3"]) == {"0.5", "1"}
    # eta = 1 is B-Approx at alpha = 0 on every tensor: the same point as binarising every group at once
    with ModelPool(tiny_bert) as pool:
        task = pool.tasks[0]
        inputs, _ = next(tiny_bert.task(task).batches("test", 8))
        scaled = EditedTaskVectors(pool, Edit("binary", 0.0, eta=1.0)).predict(task, inputs)
        plain = EditedTaskVectors(pool, Edit("binary", 0.0)).predict(task, inputs)
    assert torch.equal(scaled, plain)


def test_sass_report_matches_eq16_at_the_actual_sparsity(tiny_bert, tmp_path):
    run_analysis("sass", tiny_bert, AnalysisOptions(output_dir=tmp_path, alphas=(0.5, 0.9), bits=(1, 4), plot=False))
    raw = json.loads((tmp_path / "sass.json").read_text())
    rows = [row for task in raw["tasks"].values() for row in task["rows"]]
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row["stream_bits"] == pytest.approx(row["eq16_actual_bits"])
        assert row["file"] > row["payload"] >= row["stream_bits"] / 8
        assert row["entropy_bits"] < row["stream_bits"]


def test_figures_are_png_files(tiny_bert, tmp_path):
    pytest.importorskip("matplotlib")
    run_analysis("b-approx", tiny_bert, AnalysisOptions(output_dir=tmp_path, examples=8, alphas=(0.5,)))
    assert (tmp_path / "b-approx.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![b-approx](b-approx.png)" in (tmp_path / "b-approx.md").read_text()


def test_cli_analyze(tiny_bert, tmp_path, capsys):
    assert main(["analyze", "sass", "--backbone", "tiny-bert", "--alphas", "0.5", "--no-plot",
                 "--output-dir", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert "--alphas 0.5" in (tmp_path / "sass.md").read_text()
    with pytest.raises(SystemExit):
        main(["analyze", "pulse-width"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "pulse", "--alphas", "half"])
    assert "comma-separated numbers" in capsys.readouterr().err


def test_missing_matplotlib_fails_before_any_evaluation(tiny_bert, tmp_path, monkeypatch):
    import sys

    from mergebench.analysis.report import PlotsUnavailableError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotsUnavailableError, match=r"mergebench\[plots\]"):
        run_analysis("pulse", tiny_bert, AnalysisOptions(output_dir=tmp_path, examples=8))
    assert not list(tmp_path.iterdir())
