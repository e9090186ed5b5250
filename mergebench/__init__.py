"""mergebench: a benchmark suite for model merging."""
from mergebench.backbone import Backbone
from mergebench.method import Merged, Method, StaticMerged
from mergebench.pool import ModelPool
from mergebench.registry import BACKBONES, METHODS, SUITES, register_backbone, register_method, register_suite
from mergebench.results import Result
from mergebench.suite import Suite
from mergebench.task import Task, TaskData

__all__ = [
    "BACKBONES", "METHODS", "SUITES", "Backbone", "Merged", "Method", "ModelPool", "Result", "StaticMerged", "Suite",
    "Task", "TaskData", "register_backbone", "register_method", "register_suite",
]
__version__ = "0.1.0"
