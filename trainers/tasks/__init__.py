"""Training tasks: data + loss + metric, nothing else (see :mod:`trainers.tasks.base`).

``get_task(name, **options)`` builds a task from its name and options, e.g. from a search-space
YAML's ``task:`` section; ``task.options`` recreates it.
"""

from __future__ import annotations

import inspect
from typing import Any

from mlbtc_search.errors import SpecError

from .base import Adapter, Task
from .icl_regression import IclRegressionTask
from .text import TextTask
from .timeseries import TimeseriesTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (IclRegressionTask, TextTask, TimeseriesTask)
}


def task_options(name: str) -> dict[str, Any]:
    """The options of task ``name`` and their defaults."""
    cls = _task_class(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def get_task(name: str, **options: Any) -> Task:
    """The task ``name`` built with ``options``; unknown names and options are SpecErrors."""
    valid = task_options(name)
    for option in options:
        if option not in valid:
            raise SpecError(
                f"unknown option {option!r} for task {name!r}; valid options: {', '.join(valid)}",
                path=(option,),
            )
    return TASKS[name](**options)


def _task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise SpecError(
            f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}", path=("name",)
        )
    return TASKS[name]


__all__ = [
    "TASKS",
    "Adapter",
    "IclRegressionTask",
    "Task",
    "TextTask",
    "TimeseriesTask",
    "get_task",
    "task_options",
]
