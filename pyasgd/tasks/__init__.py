"""Tasks: what the trainer trains. The trainer knows nothing about translation; it talks to a
`Task` (pyasgd/tasks/base.py), built here from the config."""
from __future__ import annotations

from pyasgd.config import TrainConfig
from pyasgd.errors import ConfigError
from pyasgd.tasks.base import Cursor, Task

__all__ = ["Cursor", "Task", "make_task"]


def make_task(config: TrainConfig) -> Task:
    from pyasgd.tasks.synthetic import SyntheticTask
    from pyasgd.tasks.translation import TranslationTask

    tasks = {"synthetic": SyntheticTask, "translation": TranslationTask}
    try:
        return tasks[config.task](config)
    except KeyError:
        raise ConfigError(f"--task: unknown task {config.task!r}; choose one of {', '.join(tasks)}") from None
