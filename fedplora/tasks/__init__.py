"""Tasks: data, model, loss and metric for each kind of fine-tuning."""

from ..quiet import quiet_libraries
from .base import DataError, Task
from .tweets import TweetsTask

quiet_libraries()

TASKS: dict[str, type[Task]] = {"tweets": TweetsTask}


def make_task(config) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; choose one of {sorted(TASKS)}")
    return TASKS[config.task](config)


__all__ = ["DataError", "TASKS", "Task", "make_task"]
