"""Built-in tasks, looked up by name."""

from __future__ import annotations

from pathlib import Path

from sialoop.errors import ConfigError
from sialoop.tasks.base import Instance, Task

TASK_NAMES = ("lawbench", "toy")


def load_task(name: str, data: Path, *, seed: int = 0, val_fraction: float = 0.1) -> Task:
    """The task called `name`, reading its data under `data` (a one-line error if absent)."""
    if name == "lawbench":
        from sialoop.tasks.lawbench import LawBenchTask

        return LawBenchTask(data, seed=seed, val_fraction=val_fraction)
    if name == "toy":
        from sialoop.tasks.toy import ToyTask

        return ToyTask(seed=seed)
    raise ConfigError(f"unknown task '{name}': use one of {', '.join(TASK_NAMES)}")


__all__ = ["TASK_NAMES", "Instance", "Task", "load_task"]
