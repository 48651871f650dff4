"""Run a version's harness over instances in sandboxed workers, score, and store trajectories.

Each (instance, sample) becomes one stored Trajectory (one transaction), so a run killed
mid-rollout keeps every trajectory scored before the kill, and `rollout` skips those already
stored. With `samples` k > 1 each instance is solved k times (a group; the harness sees
`instance["sample"]`), which is what GRPO and the group-variance evidence read.

Stopping: Ctrl-C (any exception in the calling thread) stops a rollout within seconds. No worker
thread takes a new job, every sandbox is closed (its worker's process group killed), the threads
are joined (bounded) and the exception goes on. What was stored stays; an item in flight is
abandoned, not stored, so a resume runs it again.

Degraded: an evaluation whose items failed for the machine's reasons (`RolloutError.infra`,
after the sandbox's one retry) above `sandbox.degraded_share` of its trajectories is stored with
`degraded=True`, and the gate refuses to decide on it.
"""

from __future__ import annotations

import queue
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sialoop.config import SandboxConfig
from sialoop.gate import infra_failures
from sialoop.harness.isolation import resolve_isolation
from sialoop.harness.runtimes import harness_runtime
from sialoop.harness.sandbox import SandboxLimits
from sialoop.policy.launch import live_episode
from sialoop.records import ErrorKind, Evaluation, RolloutError, Trajectory, Version, new_id
from sialoop.runlock import LOCK_NAME
from sialoop.store import DB_NAME, Store
from sialoop.tasks.base import Instance, Task

Progress = Callable[[Trajectory], None]
Job = tuple[Instance, int]
_POLL_S = 0.5  # how often the waiting thread wakes (a Ctrl-C lands between waits)
_JOIN_S = 10.0  # after a stop, how long closed workers' threads get to return


class RolloutContext:
    def __init__(
        self, store: Store, task: Task, version: Version, policy_url: str, sandbox: SandboxConfig
    ):
        self.store, self.task, self.version = store, task, version
        self.policy_url, self.sandbox = policy_url, sandbox
        self.run_id = store.run_info().run_id
        self.harness_path = Path(store.path(version.harness_path))
        db = store.path(DB_NAME)
        self.deny_read = (
            *task.private_paths(),
            db,
            db.with_name(DB_NAME + "-wal"),
            db.with_name(DB_NAME + "-shm"),
            store.path("adapters"),
            store.path(LOCK_NAME),
        )


def _limits(cfg: SandboxConfig) -> SandboxLimits:
    return SandboxLimits(
        timeout_s=cfg.timeout_s,
        setup_timeout_s=cfg.setup_timeout_s,
        memory_mb=cfg.memory_mb,
        file_size_mb=cfg.file_size_mb,
        max_processes=cfg.max_processes,
    )


def _score(task: Task, instance: Instance, trajectory: Trajectory) -> Trajectory:
    if trajectory.error is not None:
        return trajectory
    try:
        score = task.score(instance, trajectory.output)
    except Exception as err:  # a task that cannot read an output is an invalid output
        error = RolloutError(kind=ErrorKind.invalid_output, message=f"{type(err).__name__}: {err}")
        return trajectory.model_copy(update={"error": error})
    return trajectory.model_copy(update={"score": score})


# What storing a value that SQLite or JSON cannot hold raises (pydantic's serialisation errors are
# ValueErrors); a locked or full database (sqlite3.OperationalError) is the machine's and stops.
_UNSTORABLE = (ValueError, TypeError, OverflowError, RecursionError, sqlite3.DataError,
               sqlite3.InterfaceError)  # fmt: skip


def _store(store: Store, trajectory: Trajectory) -> Trajectory:
    """Store `trajectory`; one that cannot be stored is stored as an invalid output instead."""
    try:
        store.add_trajectory(trajectory)
        return trajectory
    except _UNSTORABLE as err:
        reason = _storable(f"{type(err).__name__}: {err}")[:1000]
        message = f"the trajectory could not be stored ({reason}); output and score dropped"
        if trajectory.error is not None:
            message += "; the harness's error was: " + _storable(trajectory.error.message)
        error = RolloutError(kind=ErrorKind.invalid_output, message=message[:20_000])
        logs = _storable(trajectory.logs)
        failed = trajectory.model_copy(
            update={"output": None, "score": None, "error": error, "logs": logs}
        )
        store.add_trajectory(failed)  # plain fields only now: a failure here is the machine's
        return failed


def _storable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


class _Pool:
    """The worker threads of one rollout, each with its own sandbox, and how to stop them."""

    def __init__(
        self, ctx: RolloutContext, jobs: queue.Queue[Job], grouped: bool, on_done: Progress
    ):
        self.ctx, self.jobs, self.grouped, self.on_done = ctx, jobs, grouped, on_done
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._sandboxes: list[Any] = []
        self._lock = threading.Lock()

    def run(self, workers: int) -> None:
        threads = [
            threading.Thread(target=self._thread, name=f"rollout-{i}", daemon=True)
            for i in range(workers)
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():  # a short wait at a time: KeyboardInterrupt lands here
                    thread.join(_POLL_S)
        except BaseException:
            self.halt(threads)
            raise
        if self.errors:
            raise self.errors[0]

    def halt(self, threads: list[threading.Thread]) -> None:
        """No new job; kill what is in flight; give the threads a bounded time to return."""
        self.stop.set()
        with self._lock:
            live = list(self._sandboxes)
        for sandbox in live:
            sandbox.close()  # kills its worker's process group; an in-flight solve returns
        deadline = time.monotonic() + _JOIN_S
        for thread in threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _thread(self) -> None:
        try:
            self._serve()
        except BaseException as err:
            if not self.stop.is_set():  # after a stop, a closed sandbox's error says nothing
                self.errors.append(err)
                self.stop.set()

    def _serve(self) -> None:
        ctx = self.ctx
        runtime = harness_runtime(ctx.sandbox.runtime, ctx.sandbox.isolation)
        with runtime(
            ctx.harness_path,
            policy_url=ctx.policy_url,
            adapter=ctx.version.adapter,
            limits=_limits(ctx.sandbox),
            public_dir=ctx.store.path("public"),
            scratch_root=ctx.store.path("scratch"),
            deny_read=ctx.deny_read,
        ) as sandbox:
            with self._lock:
                self._sandboxes.append(sandbox)
            while not self.stop.is_set():  # checked after registering: halt() sees it or we stop
                try:
                    instance, sample = self.jobs.get_nowait()
                except queue.Empty:
                    return
                trajectory = self._solve(sandbox, instance, sample)
                if self.stop.is_set():  # abandoned: a resume runs it again
                    return
                self.on_done(_store(ctx.store, trajectory))

    def _solve(self, sandbox: Any, instance: Instance, sample: int) -> Trajectory:
        ctx = self.ctx
        episode = new_id("ep")
        inputs = instance.inputs | {"id": instance.id}
        if self.grouped:
            inputs["sample"] = sample
        with live_episode(ctx.policy_url, episode) as header:  # only this episode's worker
            result = sandbox.solve(inputs, header)  # gets the header that attaches its calls
        calls, sampled = ctx.store.episode_shape(episode)
        trajectory = Trajectory(
            trajectory_id=episode,
            run_id=ctx.run_id,
            version_id=ctx.version.version_id,
            split=instance.split,
            instance_id=instance.id,
            sample=sample,
            output=result.output,
            error=result.error,
            logs=result.logs,
            seconds=result.seconds,
            tokens=ctx.store.episode_tokens(episode),
            calls=calls,
            sampled_tokens=sampled,
            attempts=getattr(result, "attempts", 1),  # a plug-in runtime may not retry
        )
        return _score(ctx.task, instance, trajectory)


def rollout(
    ctx: RolloutContext,
    instances: list[Instance],
    on_done: Progress | None = None,
    reuse: bool = True,
    samples: int = 1,
) -> list[Trajectory]:
    """Trajectories of `ctx.version` on `instances`, `samples` per instance, instance-major; with
    `reuse`, stored ones are not rerun. A KeyboardInterrupt stops it (see the module docstring)."""
    done: dict[tuple[str, int], Trajectory] = {}
    if reuse and instances:
        stored = ctx.store.trajectories(ctx.version.version_id, instances[0].split)
        done = {(t.instance_id, t.sample): t for t in stored}
    todo: queue.Queue[Job] = queue.Queue()
    for instance in instances:
        for k in range(samples):
            if (instance.id, k) not in done:
                todo.put((instance, k))
    if todo.empty():
        return [done[(i.id, k)] for i in instances for k in range(samples)]
    lock = threading.Lock()
    fresh: list[Trajectory] = []

    def record(trajectory: Trajectory) -> None:
        with lock:
            fresh.append(trajectory)
        if on_done is not None:
            on_done(trajectory)

    _Pool(ctx, todo, samples > 1, record).run(min(ctx.sandbox.workers, max(1, todo.qsize())))
    by_key = done | {(t.instance_id, t.sample): t for t in fresh}
    return [by_key[(i.id, k)] for i in instances for k in range(samples)]


def evaluate(
    ctx: RolloutContext,
    instances: list[Instance],
    on_done: Progress | None = None,
    forced: bool = False,
    split: str | None = None,
) -> Evaluation:
    """Score `ctx.version` on `instances` (one split) and store the Evaluation (under `split`
    when given, e.g. "holdout" for val items the search never used)."""
    start = time.monotonic()
    trajectories = rollout(ctx, instances, on_done, reuse=not forced)
    infra = infra_failures(trajectories)
    share = ctx.sandbox.degraded_share
    counted = {i.id for i in instances if ctx.task.counts_toward_score(i)}
    evaluation = Evaluation(
        run_id=ctx.run_id,
        version_id=ctx.version.version_id,
        split=split or instances[0].split,
        metric=ctx.task.metric.name,
        direction=ctx.task.metric.direction,
        value=ctx.task.aggregate([t.score for t in trajectories if t.instance_id in counted]),
        n=len(trajectories),
        n_errors=sum(t.error is not None for t in trajectories),
        seconds=time.monotonic() - start,
        seconds_per_item=statistics.fmean(t.cost_seconds for t in trajectories),
        tokens_per_item=_tokens_per_item(trajectories),
        forced=forced,
        infra_failures=infra,
        degraded=infra > share * len(trajectories),
        detail={
            **_error_counts(trajectories),
            "isolation": resolve_isolation(ctx.sandbox.isolation),
        },
    )
    ctx.store.add_evaluation(evaluation)
    return evaluation


def _tokens_per_item(trajectories: list[Trajectory]) -> float | None:
    known = [t.tokens for t in trajectories if t.tokens is not None]
    if not known:
        return None
    return sum(known) / len(trajectories)  # an episode without LLM calls used no tokens


def _error_counts(trajectories: list[Trajectory]) -> dict[str, object]:
    counts: dict[str, int] = {}
    infra: dict[str, int] = {}
    for t in trajectories:
        if t.error is not None:
            counts[t.error.kind.value] = counts.get(t.error.kind.value, 0) + 1
            if t.error.infra:
                infra[t.error.kind.value] = infra.get(t.error.kind.value, 0) + 1
    retried = sum(t.attempts > 1 for t in trajectories)
    return {"errors": counts, "infra_errors": infra, "retried": retried}
