"""Tasks (data + loss + metric) and the compute-budgeted training loop.

``train(spec, task, budget_flops, seed, config)`` trains a model spec for the steps its budget
buys at its own cost and returns a :class:`TrainResult`; ``get_task(name, **options)`` builds a
task. Nothing here knows about Optuna or Ray.
"""

from __future__ import annotations

from .schedule import SCHEDULES, lr_factor
from .tasks import TASKS, Adapter, Task, get_task, task_options
from .train import (
    STATUSES,
    StepCosts,
    TrainConfig,
    TrainResult,
    make_optimizer,
    resolve_spec,
    train,
)

__all__ = [
    "SCHEDULES",
    "STATUSES",
    "TASKS",
    "Adapter",
    "StepCosts",
    "Task",
    "TrainConfig",
    "TrainResult",
    "get_task",
    "lr_factor",
    "make_optimizer",
    "resolve_spec",
    "task_options",
    "train",
]
