"""Progress of the long phases of a run, on a terminal and in a log file.

On a terminal a phase is a transient rich bar; when the console is not a terminal (`make run >
log`, CI) it prints one line every 10% of the phase or every 30 s, whichever comes first. Either
way the phase ends with one line (its count, running score, errors and time), so a log file and
`console.log` hold every phase. A phase that reuses stored trajectories starts at their count
and its running score includes them; one with nothing left prints a single `reused` line.

The running score is the mean of `score.value` over the phase's scored trajectories ("-" while
none is: a failed one is counted among the errors, never as 0, which would be the best value of
a time or an error): a guide while it runs, not the task's aggregate (the Evaluation is that).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
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
from sialoop.report import duration as _duration

OnDone = Callable[[Trajectory], None]  # the same as `rollout.Progress`

LINE_EVERY_FRACTION = 0.1  # non-terminal output: a line every 10% of the phase ...
LINE_EVERY_SECONDS = 30.0  # ... or every 30 s, whichever comes first


class _Tally:
    """Counts of one phase: stored ones first, then each finished trajectory (thread-safe)."""

    def __init__(self, total: int, stored: Iterable[Trajectory], clock: Callable[[], float]):
        self.total, self.clock = total, clock
        self.n = self.scored = self.errors = 0
        self.score_sum = 0.0
        for t in {(t.instance_id, t.sample): t for t in stored}.values():  # one per item
            self._add(t)
        self.reused = self.n
        self.started = clock()
        self.lock = threading.Lock()

    def _add(self, t: Trajectory) -> None:
        self.n += 1
        if t.score is not None and t.error is None:
            self.scored += 1
            self.score_sum += t.score.value
        self.errors += t.error is not None

    def add(self, t: Trajectory) -> None:
        with self.lock:
            self._add(t)

    @property
    def score(self) -> str:
        return "-" if not self.scored else f"{self.score_sum / self.scored:.3f}"

    def line(self, title: str, final: bool = False) -> str:
        elapsed = self.clock() - self.started
        head = f"{title}: {self.n}/{self.total}"
        if self.reused:
            head += f" ({self.reused} reused)"
        text = f"{head}, score {self.score}, errors {self.errors}, {_duration(elapsed)}"
        fresh = self.n - self.reused
        if not final and fresh > 0 and self.n < self.total:
            text += f", eta {_duration(elapsed / fresh * (self.total - self.n))}"
        return text + (" done" if final and self.n >= self.total else "")


@contextmanager
def phase_bar(
    console: Console,
    title: str,
    total: int,
    stored: Iterable[Trajectory] = (),
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[OnDone]:
    """Yield `advance(trajectory)`, to call once per trajectory finished in this phase (from any
    thread). `stored`: the phase's trajectories already in the store, which the phase reuses
    (one per instance and sample is counted); they count towards `total` and the running score.
    `clock` is for tests."""
    tally = _Tally(total, stored, clock)
    if tally.n >= total:
        done = "nothing to do" if not total else f"{tally.n}/{total} reused, score {tally.score}"
        console.print(f"{title}: {done}", highlight=False)
        yield tally.add
        return
    if console.is_terminal:
        with _bar(console, title, tally) as advance:
            yield advance
    else:
        with _lines(console, title, tally) as advance:
            yield advance


@contextmanager
def _bar(console: Console, title: str, tally: _Tally) -> Iterator[OnDone]:
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("score {task.fields[score]}  errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, console=console, transient=True)
    task_id = progress.add_task(
        title, total=tally.total, completed=tally.n, score=tally.score, errors=tally.errors
    )

    def advance(trajectory: Trajectory) -> None:
        tally.add(trajectory)
        progress.update(task_id, completed=tally.n, score=tally.score, errors=tally.errors)

    try:
        with progress:
            yield advance
    finally:
        console.print(_final(title, tally), highlight=False)


@contextmanager
def _lines(console: Console, title: str, tally: _Tally) -> Iterator[OnDone]:
    step = max(1, round(tally.total * LINE_EVERY_FRACTION))
    last = {"n": tally.n, "at": tally.started}

    def advance(trajectory: Trajectory) -> None:
        with tally.lock:
            tally._add(trajectory)
            now = tally.clock()
            due = tally.n - last["n"] >= step or now - last["at"] >= LINE_EVERY_SECONDS
            if not due or tally.n >= tally.total:  # the final line says the last one
                return
            last.update(n=tally.n, at=now)
            line = tally.line(title)
        console.print(line, highlight=False)

    console.print(tally.line(title), highlight=False)
    try:
        yield advance
    finally:
        console.print(_final(title, tally), highlight=False)


def _final(title: str, tally: _Tally) -> str:
    line = tally.line(title, final=True)
    return line if tally.n >= tally.total else line + f" (stopped, {tally.total - tally.n} left)"


@contextmanager
def spinner(console: Console, title: str) -> Iterator[None]:
    with console.status(f"[bold]{title}"):
        yield
    console.print(f"[green]✓[/] {title}")


# Warnings that libraries raise about themselves (deprecations, defaults that will change):
# noise in a run's output, hidden unless --verbose.
_NOISY_MODULES = r"(transformers|torch|peft|accelerate|huggingface_hub|trl)(\.|$)"


def silence_third_party(verbose: bool) -> None:
    """Unless `verbose`, turn off transformers' and huggingface_hub's progress bars, their
    logging below errors, and their FutureWarning, UserWarning and DeprecationWarning noise.

    Imports nothing: a library already imported is switched off through its API; one imported
    later reads the environment variables set here (without overriding a value the user set).
    """
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
