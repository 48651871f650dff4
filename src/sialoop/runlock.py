"""One writer per run: an exclusive `flock` on `RUN/run.lock`, held by the process that drives
the run (`run`, `resume`, `eval`) for as long as it works on it.

The kernel drops the lock when its holder dies, SIGKILL included, so a held lock is proof of a
live writer and a free one proof that none is left: `observed_status` turns a stored `running`
without a holder into `interrupted`. The holder's pid and command are written into the lock file
(after the lock is taken) so a refusal can name them. Locks from separate `open()` calls
conflict even inside one process, so a second writer in the same process is refused too.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from sialoop.errors import StoreError

LOCK_NAME = "run.lock"


def _describe(path: Path) -> str:
    try:
        held = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        held = {}
    pid, command = held.get("pid"), held.get("command", "a sialoop command")
    return f"pid {pid} ({command})" if pid else "another process"


class RunLock:
    """`with RunLock(root, "resume"):` — raises StoreError at once if another process holds it."""

    def __init__(self, root: Path, command: str):
        self.path, self.command = Path(root) / LOCK_NAME, command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:  # already ours: `with` on a lock taken earlier
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"run {self.path.parent} is in use by {_describe(self.path)}: wait for it to "
                "end, or stop it (Ctrl-C or kill) and then `sialoop resume` it"
            ) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "command": self.command, "since": time.time()}
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def holder(root: Path) -> str | None:
    """Who holds the run's lock ("pid N (command)"), or None when no live process does."""
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    finally:
        os.close(fd)
    return None


def observed_status(root: Path, status: str, reason: str | None) -> tuple[str, str | None]:
    """The stored status checked against the lock: `running` only while a live process holds
    it; otherwise the driver died without saying so (SIGKILL, OOM, power) and the run is
    `interrupted`."""
    if status == "running" and holder(root) is None:
        return "interrupted", (
            f"the process driving it ended without marking it; `sialoop resume {root}`"
        )
    return status, reason
