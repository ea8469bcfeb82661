"""Tasks: data, model, loss and metric for each kind of fine-tuning (docs/tasks.md)."""

from ..quiet import quiet_libraries
from .base import DataError, Task
from .bbc import BBCTask
from .code import CodeTask
from .glue import GLUE, GLUE_TASKS
from .instruct import InstructTask
from .tweets import TweetsTask

quiet_libraries()

# every GLUE row is a task name of its own (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)
TASKS: dict[str, type[Task]] = {"tweets": TweetsTask, "bbc": BBCTask, **GLUE_TASKS, "instruct": InstructTask,
                                "code": CodeTask}


def make_task(config) -> Task:
    """The task of a (validated) RunConfig."""
    return TASKS[config.task](config)


def check_source(config) -> None:
    """Where a (validated) RunConfig's task reads its data from, checked without loading it."""
    TASKS[config.task].check_source(config)


__all__ = ["DataError", "GLUE", "TASKS", "Task", "check_source", "make_task"]
