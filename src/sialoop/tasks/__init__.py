"""Tasks: the interface (`Task`, `Metric`, `Instance`) and where tasks come from (`load_task`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sialoop.tasks.base import ACCURACY, Instance, Metric, Split, Task
from sialoop.tasks.registry import build_task, resolve_task_class, task_names

if TYPE_CHECKING:
    from sialoop.config import RunConfig


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


def task_for(cfg: RunConfig) -> Task:
    """The task a run's config names, loaded as `run`, `resume` and `eval` all load it."""
    return load_task(
        cfg.task or "",
        cfg.data,
        seed=cfg.seed,
        val_fraction=cfg.split.val_fraction,
        task_dir=cfg.task_dir,
    )


__all__ = [
    "ACCURACY", "Instance", "Metric", "Split", "Task", "load_task", "task_for", "task_names",
]  # fmt: skip
