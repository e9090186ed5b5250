"""Typed hyperparameters: one declaration per method, checked before any work."""
from __future__ import annotations

import math

import pytest

from mergebench.errors import HyperparameterError
from mergebench.hyperparameters import Bool, Choice, Float, Hyperparameter, Int, IntList, resolve
from mergebench.registry import METHODS
from mergebench.runner import make_method

SPECS = {
    "scaling": Float(0.3, "factor", 0.0),
    "keep": Float(0.2, "kept fraction", 0.0, 1.0, low_open=True),
    "exemplars": Int(100, "per task", 1),
    "clamp": Bool(True, "clamp"),
    "loss": Choice("kl", ("kl", "mse"), "loss"),
    "bits": IntList([1, 2], "widths", choices=(1, 2, 4, 8)),
    "lambda": Float(None, "weight", 0.0, nullable=True),
}


@pytest.mark.parametrize("name, value", [
    ("scaling", math.nan), ("scaling", math.inf), ("scaling", -math.inf), ("scaling", -1e308), ("scaling", "0.3"),
    ("scaling", True), ("keep", 0.0), ("keep", 2), ("exemplars", 2.7), ("exemplars", 0), ("exemplars", "100"),
    ("exemplars", False), ("clamp", 1), ("clamp", "yes"), ("loss", "l1"), ("loss", 3), ("bits", []), ("bits", [3]),
    ("bits", [1, 1]), ("bits", 4), ("bits", [1.5]), ("lambda", -1.0), ("scaling", None),
])
def test_a_value_outside_its_declaration_names_method_hyperparameter_and_range(name, value):
    with pytest.raises(HyperparameterError, match=rf"method 'm': hyperparameter {name}=.* expected "):
        resolve(SPECS, {name: value}, "method 'm'")


def test_values_are_resolved_to_their_canonical_types():
    resolved = resolve(SPECS, {"exemplars": 3.0, "scaling": 1, "bits": [4.0, 8], "lambda": None}, "m")
    assert resolved["exemplars"] == 3 and type(resolved["exemplars"]) is int
    assert resolved["scaling"] == 1.0 and type(resolved["scaling"]) is float
    assert resolved["bits"] == [4, 8] and resolved["lambda"] is None and resolved["loss"] == "kl"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(HyperparameterError, match="has no hyperparameter nope; valid: bits, clamp, exemplars"):
        resolve(SPECS, {"nope": 1}, "method 'm'")


def test_the_allowed_values_read_as_words():
    assert SPECS["keep"].allowed() == "a finite number in (0, 1]"
    assert SPECS["exemplars"].allowed() == "an integer >= 1"
    assert SPECS["loss"].allowed() == "one of kl, mse"
    assert SPECS["lambda"].allowed() == "a finite number >= 0 or null"


def test_a_declaration_whose_default_breaks_its_own_rule_is_a_bug():
    with pytest.raises(HyperparameterError):
        Float(2.0, "x", 0.0, 1.0)
    with pytest.raises(ValueError, match="kind"):
        Hyperparameter("complex", 1j, "x")


def test_every_method_declares_typed_documented_hyperparameters():
    for name, cls in METHODS.items():
        for key, spec in cls.hyperparameters.items():
            assert isinstance(spec, Hyperparameter), (name, key)
            assert spec.help and spec.allowed(), (name, key)
        assert make_method(name).hparams == cls.defaults()  # the defaults pass their own checks


@pytest.mark.parametrize("method, overrides, message", [
    ("ties", {"keep": 2}, r"keep=2 .* \(0, 1\]"),
    ("task-arithmetic", {"scaling": math.nan}, "scaling=nan"),
    ("auto-switch", {"neighbours": 0}, "neighbours=0"),
    ("regmean", {"exemplars": 2.7}, "exemplars=2.7"),
    ("dare", {"drop_rate": 1.0}, r"\[0, 1\)"),
    ("twin-merging", {"shared": "emr-merging"}, "static exemplar-free method: .*task-arithmetic"),
    ("flexswitch", {"bit_widths": [3]}, r"bit_widths=\[3\]"),
])
def test_methods_refuse_bad_values_when_made(method, overrides, message):
    with pytest.raises(HyperparameterError, match=message):
        make_method(method, overrides)
