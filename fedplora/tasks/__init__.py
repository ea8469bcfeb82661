"""Tasks: data, model, loss and metric for each kind of fine-tuning (docs/tasks.md)."""

from ..quiet import quiet_libraries
from .base import DataError, Task
from .bbc import BBCTask
from .code import CodeTask
from .instruct import InstructTask
from .sst2 import SST2Task
from .tweets import TweetsTask

quiet_libraries()

TASKS: dict[str, type[Task]] = {"tweets": TweetsTask, "bbc": BBCTask, "sst2": SST2Task, "instruct": InstructTask,
                                "code": CodeTask}


def make_task(config) -> Task:
    """The task of a (validated) RunConfig."""
    return TASKS[config.task](config)


__all__ = ["DataError", "TASKS", "Task", "make_task"]
