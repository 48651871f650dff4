"""Where the policy endpoint reports each call it served.

The run store implements `Recorder` (writing SQLite); `MemoryRecorder` keeps calls in memory for
tests and short scripts. The server calls `record` once per returned choice, before it sends the
response, and logs (never raises) a recorder failure, so a broken store cannot fail a request.
"""

from __future__ import annotations

import threading
from typing import Protocol

from sialoop.records import LLMCall


class Recorder(Protocol):
    def record(self, call: LLMCall) -> None:
        """Stores one call. May be called from several threads at once."""
        ...


class MemoryRecorder:
    """A thread-safe in-memory list of calls, in the order they were recorded."""

    def __init__(self) -> None:
        self._calls: list[LLMCall] = []
        self._lock = threading.Lock()

    def record(self, call: LLMCall) -> None:
        with self._lock:
            self._calls.append(call)

    def calls(self, episode_id: str | None = None) -> list[LLMCall]:
        """Every call, or (given an id) only that episode's calls."""
        with self._lock:
            return [c for c in self._calls if episode_id is None or c.episode_id == episode_id]
