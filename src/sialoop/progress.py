"""Rich progress bars for the long phases of a run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sialoop.records import Trajectory
from sialoop.rollout import Progress as OnDone


@contextmanager
def phase_bar(console: Console, title: str, total: int) -> Iterator[OnDone]:
    """A bar advanced once per finished trajectory, showing the running score and errors."""
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("score {task.fields[score]}  errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task_id = progress.add_task(title, total=total, score="-", errors=0)
        seen = {"n": 0, "sum": 0.0, "errors": 0}

        def advance(trajectory: Trajectory) -> None:
            seen["n"] += 1
            seen["sum"] += trajectory.score.value if trajectory.score else 0.0
            seen["errors"] += trajectory.error is not None
            progress.update(
                task_id,
                advance=1,
                score=f"{seen['sum'] / seen['n']:.3f}",
                errors=seen["errors"],
            )

        yield advance


@contextmanager
def spinner(console: Console, title: str) -> Iterator[None]:
    with console.status(f"[bold]{title}"):
        yield
    console.print(f"[green]✓[/] {title}")
