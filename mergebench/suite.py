"""Suite: a registered, named list of tasks plus the backbones that have fine-tuned
checkpoints for them.

A suite module in ``tasks/`` declares its Suite (``register_suite``) and its backbones
(``register_backbone``); a backbone names its suite and the suite's tasks it has
checkpoints for, which may be fewer than the suite's (GLUE's mamba-130m has no STS-B).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from mergebench.registry import BACKBONES, SUITES
from mergebench.task import Task, TaskData, routing_view

if TYPE_CHECKING:
    from mergebench.backbone import Backbone


class Suite:
    """``data`` makes the TaskData that reads the suite's files through one backbone;
    ``system_commands`` install the system packages its data comes from (run by
    ``mergebench prepare --install-data``)."""

    def __init__(self, name: str, tasks: Sequence[Task], data: Callable[[Backbone], TaskData], *,
                 description: str = "", system_commands: Iterable[Sequence[str]] = ()):
        self.name = name
        self.tasks = tuple(tasks)
        self.data = data
        self.description = description
        self.system_commands = [list(command) for command in system_commands]
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {name!r} declares a task twice: {', '.join(names)}")
        routing_view(self.tasks)  # a router of the suite reads every task's inputs alike

    def __repr__(self) -> str:
        return f"Suite({self.name!r}, {len(self.tasks)} tasks)"

    @property
    def backbones(self) -> list[str]:
        """The registered backbones with fine-tuned checkpoints for this suite's tasks."""
        return [name for name, cls in BACKBONES.items() if cls.suite == self.name]

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"suite {self.name!r} has no task {name!r}; its tasks: {', '.join(t.name for t in self.tasks)}")

    def tasks_for(self, backbone: Backbone | type[Backbone]) -> tuple[Task, ...]:
        """The tasks a backbone (class or instance) has fine-tuned checkpoints for, in its
        order, as declared: what is known before any file is read."""
        return tuple(self.task(name) for name in backbone.task_names)

    def missing(self, backbone: Backbone | type[Backbone]) -> tuple[str, ...]:
        """The suite's tasks a backbone has no fine-tuned checkpoints for."""
        return tuple(task.name for task in self.tasks if task.name not in backbone.task_names)

    def bind(self, backbone: Backbone) -> tuple[Task, ...]:
        """The backbone's tasks, reading their files through one TaskData of the backbone."""
        data = self.data(backbone)
        return tuple(task.bind(data) for task in self.tasks_for(backbone))


def declared_tasks(backbone: Backbone | type[Backbone]) -> tuple[Task, ...]:
    """A backbone's tasks, as far as they are known before a backbone is made: a class's
    from its registered suite, an instance's its own."""
    if isinstance(backbone, type):
        return SUITES.get(backbone.suite).tasks_for(backbone)
    return backbone.tasks
