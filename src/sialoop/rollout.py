"""Run a version's harness over instances in sandboxed workers, score, and store trajectories.

Each instance becomes one stored Trajectory (one transaction), so a run killed mid-rollout keeps
every trajectory scored before the kill, and `rollout` skips instances already stored.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sialoop.config import SandboxConfig
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.records import ErrorKind, Evaluation, RolloutError, Trajectory, Version, new_id
from sialoop.store import DB_NAME, Store
from sialoop.tasks.base import Instance, Task

Progress = Callable[[Trajectory], None]


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
        )


def _limits(cfg: SandboxConfig) -> SandboxLimits:
    return SandboxLimits(
        timeout_s=cfg.timeout_s,
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


def _worker_loop(ctx: RolloutContext, jobs: queue.Queue[Instance], on_done: Progress) -> None:
    with Sandbox(
        ctx.harness_path,
        policy_url=ctx.policy_url,
        adapter=ctx.version.adapter,
        limits=_limits(ctx.sandbox),
        public_dir=ctx.store.path("public"),
        scratch_root=ctx.store.path("scratch"),
        deny_read=ctx.deny_read,
    ) as sandbox:
        while True:
            try:
                instance = jobs.get_nowait()
            except queue.Empty:
                return
            episode = new_id("ep")
            result = sandbox.solve(instance.inputs | {"id": instance.id}, episode)
            trajectory = Trajectory(
                trajectory_id=episode,
                run_id=ctx.run_id,
                version_id=ctx.version.version_id,
                split=instance.split,
                instance_id=instance.id,
                output=result.output,
                error=result.error,
                logs=result.logs,
                seconds=result.seconds,
            )
            trajectory = _score(ctx.task, instance, trajectory)
            ctx.store.add_trajectory(trajectory)
            on_done(trajectory)


def rollout(
    ctx: RolloutContext,
    instances: list[Instance],
    on_done: Progress | None = None,
    reuse: bool = True,
) -> list[Trajectory]:
    """Trajectories of `ctx.version` on `instances`; with `reuse`, stored ones are not rerun."""
    done: dict[str, Trajectory] = {}
    if reuse and instances:
        stored = ctx.store.trajectories(ctx.version.version_id, instances[0].split)
        done = {t.instance_id: t for t in stored}
    todo: queue.Queue[Instance] = queue.Queue()
    for instance in instances:
        if instance.id not in done:
            todo.put(instance)
    lock = threading.Lock()
    fresh: list[Trajectory] = []

    def record(trajectory: Trajectory) -> None:
        with lock:
            fresh.append(trajectory)
        if on_done is not None:
            on_done(trajectory)

    workers = min(ctx.sandbox.workers, max(1, todo.qsize()))
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(_worker_loop, ctx, todo, record) for _ in range(workers)]:
            future.result()
    by_id = done | {t.instance_id: t for t in fresh}
    return [by_id[i.id] for i in instances]


def evaluate(
    ctx: RolloutContext,
    instances: list[Instance],
    on_done: Progress | None = None,
    forced: bool = False,
) -> Evaluation:
    """Score `ctx.version` on `instances` (one split) and store the Evaluation."""
    start = time.monotonic()
    trajectories = rollout(ctx, instances, on_done, reuse=not forced)
    scores = [t.score for t in trajectories]
    evaluation = Evaluation(
        run_id=ctx.run_id,
        version_id=ctx.version.version_id,
        split=instances[0].split,
        metric=ctx.task.metric,
        value=ctx.task.aggregate(scores),
        n=len(trajectories),
        n_errors=sum(t.error is not None for t in trajectories),
        seconds=time.monotonic() - start,
        forced=forced,
        detail=_error_counts(trajectories),
    )
    ctx.store.add_evaluation(evaluation)
    return evaluation


def _error_counts(trajectories: list[Trajectory]) -> dict[str, object]:
    counts: dict[str, int] = {}
    for t in trajectories:
        if t.error is not None:
            counts[t.error.kind.value] = counts.get(t.error.kind.value, 0) + 1
    return {"errors": counts}
