"""Tasks: the interface (`Task`, `Metric`, `Instance`) and where tasks come from (`load_task`)."""

from __future__ import annotations

from pathlib import Path

from sialoop.tasks.base import ACCURACY, Instance, Metric, Split, Task
from sialoop.tasks.registry import build_task, resolve_task_class, task_names


def load_task(
    name: str,
    data: Path | None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    task_dir: Path | None = None,
) -> Task:
    """The task `name` names (a built-in or entry-point name, `file.py:Class`, `module:Class`),
    or the SIA-layout folder `task_dir`; reads its data under `data` (a one-line error if absent)."""
    if task_dir is not None:
        from sialoop.tasks.folder import FolderTask

        return FolderTask(task_dir, seed=seed, val_fraction=val_fraction)
    cls = resolve_task_class(name)
    return build_task(cls, data=data, seed=seed, val_fraction=val_fraction)


__all__ = ["ACCURACY", "Instance", "Metric", "Split", "Task", "load_task", "task_names"]
