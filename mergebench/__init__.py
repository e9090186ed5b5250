"""mergebench: a benchmark suite for model merging."""
from mergebench.backbone import Backbone, Task
from mergebench.method import Merged, Method, StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES, METHODS, register_backbone, register_method
from mergebench.results import Result

__all__ = [
    "BACKBONES", "METHODS", "Backbone", "Merged", "Method", "ModelPool", "Result", "StaticMerged", "Task",
    "register_backbone", "register_method",
]
__version__ = "0.1.0"
