"""The trusted runtime for program tasks: a candidate program runs in an isolated worker, never
in the loop's process, and its large inputs and outputs cross as files in shared memory.

- `Workspace`: a work dir in /dev/shm (memory; the temp dir where there is none) with an
  `exchange/` folder that workers see read-only as their `public/`, tagged with its owner's pid
  and start time so that a later task removes the dirs of a process that died without cleaning
  up (a run killed by a signal skips atexit, and gigabytes left in /dev/shm are gigabytes of
  RAM the next run's programs then miss).
- `ProgramRunner`: one program in one `Sandbox` worker. The task's trusted wrapper (its own
  `runner.py`) is the worker's harness; the program sits beside it in `exchange/programs/`.
  `call(job)` sends one job and answers the wrapper's reply, the wall time measured here, and
  the worker's scratch dir, where the wrapper wrote its output.

A task supplies the wrapper, writes the inputs, reads and checks the outputs: the program never
sees what it is checked against (the task's `deny` paths are unreadable in the worker).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.records import new_id

_OWNER = "owner"


_SELF_SOLVE = '''def solve(instance, llm):
    """Added by sialoop: this file defines {entry} and no solve, so it is its own program."""
    import pathlib

    return {{"program": pathlib.Path(__file__).read_text()}}
'''


def self_solving(source: str, entry: str) -> str:
    """`source` as a harness: a file defining `entry` (a program task's entry point) and no
    `solve` gets a `solve` answering the file itself; any other source is returned unchanged
    (a syntax error is left for validation to report)."""
    import ast

    try:
        names = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    except SyntaxError:
        return source
    if "solve" in names or entry not in names:
        return source
    return source.rstrip("\n") + "\n\n\n" + _SELF_SOLVE.format(entry=entry)


class ProgramFailed(Exception):
    """A candidate program failed: it raised, broke its worker, or its output failed a check.
    `figures` holds what was measured of an output that failed its check (empty otherwise), so
    a report can say what the output would have scored without the check ever counting it."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = dict(figures or {})


def exchange_root() -> Path:
    """/dev/shm when it is there (data crosses as files in memory), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def owner_tag(pid: int) -> str:
    """The pid and its start time: a pid the OS has reused for another process does not match."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid} {start}"


def remove_orphans(root: Path, prefix: str) -> None:
    """Delete `prefix*` work dirs under `root` whose owning process is gone."""
    for work in root.glob(f"{prefix}*"):
        try:
            pid, _ = (work / _OWNER).read_text().split(" ", 1)
            alive = owner_tag(int(pid)) == (work / _OWNER).read_text()
        except (OSError, ValueError):
            alive = time.time() - work.stat().st_mtime < 60  # no tag yet: being created
        if not alive:
            shutil.rmtree(work, ignore_errors=True)


class Workspace:
    """A task's work dir: `exchange/` (the workers' public dir) and private folders beside it."""

    def __init__(self, prefix: str, root: Path | None = None):
        base = root if root is not None else exchange_root()
        remove_orphans(base, prefix)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        (self.dir / _OWNER).write_text(owner_tag(os.getpid()))
        self.exchange = self.dir / "exchange"
        (self.exchange / "programs").mkdir(parents=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ProgramRunner:
    """One program in one sandbox worker (see the module docstring)."""

    def __init__(
        self, wrapper: str, source: str, workspace: Workspace, limits: SandboxLimits,
        isolation: str, deny: tuple[Path, ...], tag: str = "program",
    ):  # fmt: skip
        self.dir = Path(tempfile.mkdtemp(prefix="program-", dir=workspace.dir))
        self.tag = tag
        harness = self.dir / "runner.py"
        harness.write_text(wrapper, encoding="utf-8")
        self.program = f"programs/{self.dir.name}.py"
        self._program_file = workspace.exchange / self.program
        self._program_file.write_text(source, encoding="utf-8")
        self.sandbox = Sandbox(
            harness,
            policy_url=None,
            adapter="base",
            limits=limits,
            public_dir=workspace.exchange,
            scratch_root=self.dir,
            deny_read=deny,
            isolation=isolation,
        )
        self.sandbox.__enter__()
        error = self.sandbox.start()  # the worker's start-up is never on a run's clock
        if error is not None:
            self.close()
            raise ProgramFailed(f"{error.kind.value}: {error.message[:500]}")

    def call(self, job: dict[str, Any]) -> tuple[dict[str, Any], float, Path]:
        """(the wrapper's reply, wall seconds measured here, the worker's scratch dir)."""
        starts = self.sandbox.starts
        start = time.perf_counter()
        result = self.sandbox.solve({"program": self.program, **job}, new_id(self.tag))
        wall = time.perf_counter() - start
        if result.error is not None:
            raise ProgramFailed(f"{result.error.kind.value}: {result.error.message[:500]}")
        if self.sandbox.starts != starts:  # a worker's start-up was on this run's clock
            raise ProgramFailed("the worker restarted during a run: its time is not the program's")
        workdir = self.sandbox.workdir
        if workdir is None:
            raise ProgramFailed("the program's worker is gone")
        reply = result.output if isinstance(result.output, dict) else {}
        return reply, wall, workdir

    def close(self) -> None:
        try:
            self.sandbox.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._program_file.unlink(missing_ok=True)
