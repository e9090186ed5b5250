"""Registries of methods and backbones, and Method hyperparameters."""
from __future__ import annotations

import pytest

from mergebench.method import HyperparameterError, Method, StaticMerged
from mergebench.registry import BACKBONES, METHODS, Registry, UnknownNameError, register_method
from mergebench.runner import make_method

BUILTIN_METHODS = {"pretrained", "individual", "weight-averaging", "task-arithmetic", "ties", "dare"}


def test_builtin_plugins_are_registered():
    assert BUILTIN_METHODS <= set(METHODS.names())
    assert "tiny-bert" in BACKBONES.names()
    for name, cls in METHODS.items():
        assert issubclass(cls, Method)
        assert cls.name == name  # the record's method name is the registry name


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        METHODS.get("task-arithmetik")
    message = str(info.value)
    assert "'task-arithmetik'" in message
    for name in METHODS.names():
        assert name in message
    assert not message.startswith('"')  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError)  # callers catching KeyError still work


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        BACKBONES.get("tiny-bart")
    message = str(info.value)
    assert "unknown backbone 'tiny-bart'" in message
    assert "tiny-bert" in message
    for name in BACKBONES.names():
        assert name in message


def test_empty_registry_says_none():
    registry = Registry("thing", "mergebench.methods", "mergebench.no-such-group")
    registry._loaded = True  # no plugin loading: an empty registry
    with pytest.raises(UnknownNameError, match=r"valid things: \(none\)"):
        registry.get("x")


class _First(Method):
    name = "test-dup"

    def merge(self, pool, exemplars=None):
        return StaticMerged(pool.backbone, pool.pretrained_state())


class _Second(_First):
    pass


@pytest.fixture
def isolated_methods(monkeypatch):
    """The global method registry, restored after the test."""
    METHODS.names()  # load the built-in plugins first
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    return METHODS


def test_register_twice_with_another_object_raises(isolated_methods):
    assert register_method("test-dup")(_First) is _First
    assert register_method("test-dup")(_First) is _First  # the same object again is fine (re-import)
    with pytest.raises(ValueError, match="'test-dup' is registered twice"):
        register_method("test-dup")(_Second)
    assert isolated_methods.get("test-dup") is _First  # the first registration stands


def test_register_builtin_name_with_another_object_raises(isolated_methods):
    original = isolated_methods.get("task-arithmetic")
    with pytest.raises(ValueError, match="registered twice"):
        register_method("task-arithmetic")(_Second)
    assert isolated_methods.get("task-arithmetic") is original


def test_registration_gives_the_class_its_name(isolated_methods):
    class Named(_First):
        pass

    register_method("test-named")(Named)
    assert Named.name == "test-named" and _First.name == "test-dup"  # the parent keeps its own
    assert make_method("test-named").name == "test-named"


def test_registered_method_is_found_by_name(isolated_methods):
    register_method("test-dup")(_First)
    assert "test-dup" in isolated_methods.names()
    assert isinstance(make_method("test-dup"), _First)


def test_default_hyperparameters():
    method = make_method("ties")
    assert method.hparams == {"keep": 0.2, "scaling": 0.3, "merge_func": "mean"}
    assert make_method("dare").hparams == {"drop_rate": 0.5, "scaling": 0.3}
    assert make_method("weight-averaging").hparams == {}


def test_hyperparameter_override_does_not_touch_defaults():
    cls = METHODS.get("ties")
    defaults = cls.defaults()
    method = make_method("ties", {"keep": 0.5})
    assert method.hparams == {"keep": 0.5, "scaling": 0.3, "merge_func": "mean"}
    assert cls.defaults() == defaults
    assert make_method("ties").hparams["keep"] == 0.2  # a later instance sees the defaults again
    method.hparams["scaling"] = 9.0
    assert cls.defaults()["scaling"] == 0.3  # hparams is a copy
    flex = make_method("flexswitch")
    flex.hparams["bit_widths"].append(16)
    assert METHODS.get("flexswitch").defaults()["bit_widths"] == [1, 2, 4, 8]  # lists are copied too


def test_make_method_sets_seed():
    assert make_method("dare", seed=7).seed == 7
    assert make_method("dare").seed == 0


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(HyperparameterError) as info:
        make_method("ties", {"kepp": 0.5, "scaling": 1.0})
    message = str(info.value)
    assert "'ties'" in message
    assert "kepp" in message
    assert "valid: keep, merge_func, scaling" in message
    assert isinstance(info.value, ValueError)


def test_hyperparameter_on_method_without_any():
    with pytest.raises(HyperparameterError, match=r"no hyperparameter scaling; valid: \(none\)"):
        make_method("pretrained", {"scaling": 0.3})


def test_unknown_method_via_make_method():
    with pytest.raises(UnknownNameError, match="valid methods: .*task-arithmetic"):
        make_method("nope")


def test_method_flags():
    individual, pretrained, ta = (make_method(n) for n in ("individual", "pretrained", "task-arithmetic"))
    assert individual.reference and pretrained.reference and not ta.reference
    assert individual.dynamic and not individual.automatic  # needs the task identity
    assert ta.automatic and not ta.dynamic
    assert ta.exemplars_per_task == 0
