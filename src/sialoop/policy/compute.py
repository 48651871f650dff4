"""The one thread that runs this process's torch compute: the endpoint's model calls, the
trainer, and anything else that runs the model on CPU.

Why one thread: torch's CPU build uses GNU OpenMP, which keeps a pool of worker threads for each
thread that starts parallel regions. Once two threads have done so, there are more pooled
threads than cores and libgomp stops spinning between regions, so every small op pays a futex
wake-up. Measured on 2 cores: the endpoint's LawBench scoring went from 0.31 to 0.49 s per item,
for the rest of the process, after one forward pass on the main thread (a training run on the
main thread does the same). `run_compute(fn)` runs `fn` on the compute thread and waits; called
from that thread it just runs `fn`.

Ctrl-C: the caller's wait is interrupted at once and `cancelled()` turns true, so a long job that
checks it (the trainer does, between optimizer steps) stops with KeyboardInterrupt too; the
next job clears it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_jobs: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_cancel = threading.Event()


def _serve() -> None:
    while True:
        fn, future = _jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        _cancel.clear()
        try:
            future.set_result(fn())
        except BaseException as err:  # handed to the caller, whatever it is
            future.set_exception(err)


def _started() -> threading.Thread:
    global _thread
    with _start_lock:
        if _thread is None:
            # A daemon: a process leaving after Ctrl-C does not wait for a job still running.
            _thread = threading.Thread(target=_serve, name="sialoop-compute", daemon=True)
            _thread.start()
        return _thread


def on_compute_thread() -> bool:
    return threading.current_thread() is _thread


def run_compute(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the compute thread; its result, or its exception raised here."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    _started()
    future: Future = Future()
    _jobs.put((lambda: fn(*args, **kwargs), future))
    try:
        return future.result()
    except KeyboardInterrupt:
        if not future.done():
            _cancel.set()
        raise


def cancelled() -> bool:
    """True once a caller waiting on the running job was interrupted (Ctrl-C)."""
    return _cancel.is_set()
