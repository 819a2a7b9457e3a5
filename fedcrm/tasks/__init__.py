"""Federated tasks, one module each, behind one protocol (:mod:`fedcrm.tasks.base`)."""

from __future__ import annotations

from fedcrm.protocol import TaskKind
from fedcrm.tasks.base import Task
from fedcrm.tasks.churn import CHURN
from fedcrm.tasks.trend import TREND

TASKS: dict[TaskKind, Task] = {CHURN.kind: CHURN, TREND.kind: TREND}


def task_for(kind: TaskKind) -> Task:
    """The definition of a task kind."""
    return TASKS[TaskKind(kind)]
