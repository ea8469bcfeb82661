"""Tasks: data, model, loss and metric for each kind of fine-tuning (docs/tasks.md)."""

from pathlib import Path

from ..quiet import quiet_libraries
from .base import DataError, Task
from .bbc import BBCTask
from .code import CodeTask
from .flowertune import FLOWERTUNE_TASKS
from .glue import GLUE, GLUE_TASKS
from .instruct import InstructTask
from .tweets import TweetsTask

quiet_libraries()

# every GLUE row is a task name of its own (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)
TASKS: dict[str, type[Task]] = {"tweets": TweetsTask, "bbc": BBCTask, **GLUE_TASKS, "instruct": InstructTask,
                                "code": CodeTask, **FLOWERTUNE_TASKS}  # flowertune-<challenge>: FlowerTune's four


def make_task(config) -> Task:
    """The task of a (validated) RunConfig."""
    return TASKS[config.task](config)


def check_source(config) -> None:
    """Where a (validated) RunConfig's task reads its data from, checked without loading it."""
    TASKS[config.task].check_source(config)


# the partitioners whose draw can leave a client without data however large the data (label skew, natural
# groups); iid and dirichlet_per_client give equal sizes and fail only on too few examples or a missing
# column, which the clients report after the start-up
MAY_LEAVE_A_CLIENT_EMPTY = ("dirichlet", "pathological", "natural")


def check_partitions(config) -> None:
    """Draw the clients' partitions once where the partitioner may fail, so that an impossible split (e.g.
    per-class Dir(0.01) over 100 clients) is one DataError line in seconds, before the federation's start-up
    rather than after it. The draw is seeded: every client and the server draw the same partitions later.

    Local data only: a hub dataset (``dataset`` that is no path here) would be fetched by this process,
    which is not offline like the federation's, so its split is checked by the federation as before."""
    if config.partitioner not in MAY_LEAVE_A_CLIENT_EMPTY:
        return
    if config.dataset and not Path(str(config.dataset)).expanduser().exists():
        return
    from .partition import partition_for

    task = make_task(config)
    train, _ = task.splits()
    partition_for(task, train, config)


__all__ = ["DataError", "GLUE", "MAY_LEAVE_A_CLIENT_EMPTY", "TASKS", "Task", "check_partitions", "check_source",
           "make_task"]
