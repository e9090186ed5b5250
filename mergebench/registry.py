"""Name -> plugin registries for methods, backbones and suites.

Built-in plugins are the modules of ``mergebench.methods`` and ``mergebench.tasks``:
each registers itself with a decorator when imported, so adding a method is one new
file. Third-party packages add plugins through the entry-point groups
``mergebench.methods`` and ``mergebench.tasks`` (the way pytest finds plugins).
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


from mergebench.errors import UnknownNameError  # noqa: E402  (re-exported)


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, entry_point_group: str):
        self.kind = kind
        self._package = package
        self._group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def _load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self._package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self._package}.{module.name}")
        for entry_point in entry_points(group=self._group):
            entry_point.load()  # importing the module registers its plugins
        if self._group == "mergebench.tasks":  # suite files a parent process registered (sweep workers)
            from mergebench.suite_config import register_from_environment

            register_from_environment()

    def get(self, name: str) -> T:
        self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load_plugins()
        return sorted(self._items.items())


METHODS: Registry = Registry("method", "mergebench.methods", "mergebench.methods")
BACKBONES: Registry = Registry("backbone", "mergebench.tasks", "mergebench.tasks")
SUITES: Registry = Registry("suite", "mergebench.tasks", "mergebench.tasks")  # the same plugins register both

SUITE_KINDS: Registry = Registry("suite kind", "mergebench.tasks", "mergebench.tasks")  # suite-file builders

register_backbone = BACKBONES.register
register_suite_kind = SUITE_KINDS.register  # name -> builder(SuiteConfig) registering a suite from a file


def register_suite(suite: T) -> T:
    """Register a Suite object under its own name."""
    return SUITES.register(suite.name)(suite)


def register_method(name: str) -> Callable[[type], type]:
    """Register a Method class under ``name``, which becomes its ``name``: written once."""
    register = METHODS.register(name)

    def decorator(cls: type) -> type:
        register(cls)
        cls.name = name
        return cls

    return decorator
