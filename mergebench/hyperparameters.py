"""Typed hyperparameters, declared once per method.

A method declares each hyperparameter with its type, default, allowed values and a
one-line meaning; the command line shows these (``mergebench list``) and checks every
requested value against them before any work starts, so a bad value names the
option, the method and the allowed range instead of failing halfway through a run.
Non-finite numbers are refused everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from mergebench.errors import HyperparameterError

_KINDS = ("int", "float", "bool", "str", "int-list")


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: ``kind`` is int, float, bool, str or int-list; numbers lie in
    [low, high] (an open end when ``low_open`` / ``high_open``); a str or the elements of an
    int-list are one of ``choices``; ``nullable`` allows None (e.g. "the loss's default")."""

    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"hyperparameter kind {self.kind!r}; valid: {', '.join(_KINDS)}")
        self.check("default", self.default, "<declaration>")  # a declaration that breaks its own rule is a bug

    # --- description ------------------------------------------------------------
    def allowed(self) -> str:
        """The allowed values in words, e.g. ``a number in (0, 1]`` or ``one of kl, mse, cka``."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = f"one of {', '.join(map(str, self.choices))}" if self.choices else "a string"
        elif self.kind == "int-list":
            elements = f" from {{{', '.join(map(str, self.choices))}}}" if self.choices else ""
            text = f"a non-empty list of distinct integers{elements}"
        else:
            noun = "an integer" if self.kind == "int" else "a finite number"
            text = noun + self._range()
        return text + (" or null" if self.nullable else "")

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    # --- validation ---------------------------------------------------------------
    def check(self, name: str, value: Any, owner: str) -> Any:
        """The value in its canonical type, or HyperparameterError naming ``owner`` (the
        method), the hyperparameter and what is allowed."""

        given = value

        def refuse() -> HyperparameterError:
            return HyperparameterError(f"{owner}: hyperparameter {name}={given!r} is not allowed; "
                                       f"expected {self.allowed()}")

        if value is None:
            if self.nullable:
                return None
            raise refuse()
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise refuse()
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise refuse()
            return value
        if self.kind == "int-list":
            if (not isinstance(value, (list, tuple)) or not value or len(set(map(repr, value))) != len(value)
                    or not all(_is_integral(v) for v in value)
                    or (self.choices and any(int(v) not in self.choices for v in value))):
                raise refuse()
            return [int(v) for v in value]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise refuse()
        if self.kind == "int":
            if not _is_integral(value):
                raise refuse()
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise refuse()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise refuse()
        return value


def _is_integral(value: Any) -> bool:
    """An int, or a float with no fractional part (``3.0`` from a YAML file); never a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())


# --- short constructors, so a declaration reads as one line ----------------------------
def Float(default: float | None, help: str, low: float | None = None, high: float | None = None, *,
          low_open: bool = False, high_open: bool = False, nullable: bool = False) -> Hyperparameter:
    return Hyperparameter("float", default, help, low, high, low_open, high_open, nullable=nullable)


def Int(default: int, help: str, low: int | None = None, high: int | None = None) -> Hyperparameter:
    return Hyperparameter("int", default, help, low, high)


def Bool(default: bool, help: str) -> Hyperparameter:
    return Hyperparameter("bool", default, help)


def Choice(default: str, choices: tuple[str, ...], help: str) -> Hyperparameter:
    return Hyperparameter("str", default, help, choices=tuple(choices))


def IntList(default: list[int], help: str, choices: tuple[int, ...] | None = None) -> Hyperparameter:
    return Hyperparameter("int-list", list(default), help, choices=choices)


def defaults(specs: Mapping[str, Hyperparameter]) -> dict[str, Any]:
    """name -> default value (lists copied, so a run never changes a declaration)."""
    return {name: (list(spec.default) if isinstance(spec.default, list) else spec.default)
            for name, spec in specs.items()}


def resolve(specs: Mapping[str, Hyperparameter], overrides: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Defaults updated by ``overrides``, each checked; unknown names list the valid ones."""
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        valid = ", ".join(sorted(specs)) or "(none)"
        raise HyperparameterError(f"{owner} has no hyperparameter {', '.join(unknown)}; valid: {valid}")
    return {**defaults(specs), **{name: specs[name].check(name, value, owner) for name, value in overrides.items()}}
