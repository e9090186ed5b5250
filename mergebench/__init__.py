"""mergebench: a benchmark suite for model merging."""
from __future__ import annotations

import importlib

# name -> the module that defines it, imported on first use: `import mergebench.cli` (and so
# `mergebench --help`) must not import torch
_EXPORTS = {
    "Backbone": "mergebench.backbone", "Task": "mergebench.task", "TaskData": "mergebench.task",
    "Suite": "mergebench.suite",
    "Merged": "mergebench.method", "Method": "mergebench.method", "StaticMerged": "mergebench.method",
    "ModelPool": "mergebench.pool",
    "BACKBONES": "mergebench.registry", "METHODS": "mergebench.registry", "SUITES": "mergebench.registry",
    "register_backbone": "mergebench.registry", "register_method": "mergebench.registry",
    "register_suite": "mergebench.registry",
    "Result": "mergebench.results",
    "load": "mergebench.export",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mergebench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
