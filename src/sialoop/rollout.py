"""Run a version's harness over instances in sandboxed workers, score, and store trajectories.

Each (instance, sample) becomes one stored Trajectory (one transaction), so a run killed
mid-rollout keeps every trajectory scored before the kill, and `rollout` skips those already
stored. With `samples` k > 1 each instance is solved k times (a group; the harness sees
`instance["sample"]`), which is what GRPO and the group-variance evidence read.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sialoop.config import SandboxConfig
from sialoop.harness.runtimes import harness_runtime
from sialoop.harness.sandbox import SandboxLimits
from sialoop.records import ErrorKind, Evaluation, RolloutError, Trajectory, Version, new_id
from sialoop.store import DB_NAME, Store
from sialoop.tasks.base import Instance, Task

Progress = Callable[[Trajectory], None]
Job = tuple[Instance, int]


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


def _worker_loop(ctx: RolloutContext, jobs: queue.Queue[Job], grouped: bool, on_done: Progress):
    runtime = harness_runtime(ctx.sandbox.runtime)
    with runtime(
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
                instance, sample = jobs.get_nowait()
            except queue.Empty:
                return
            episode = new_id("ep")
            inputs = instance.inputs | {"id": instance.id}
            if grouped:
                inputs["sample"] = sample
            result = sandbox.solve(inputs, episode)
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
            )
            trajectory = _score(ctx.task, instance, trajectory)
            ctx.store.add_trajectory(trajectory)
            on_done(trajectory)


def rollout(
    ctx: RolloutContext,
    instances: list[Instance],
    on_done: Progress | None = None,
    reuse: bool = True,
    samples: int = 1,
) -> list[Trajectory]:
    """Trajectories of `ctx.version` on `instances`, `samples` per instance, instance-major; with
    `reuse`, stored ones are not rerun."""
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

    workers = min(ctx.sandbox.workers, max(1, todo.qsize()))
    with ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(_worker_loop, ctx, todo, samples > 1, record) for _ in range(workers)
        ]
        for future in futures:
            future.result()
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
    evaluation = Evaluation(
        run_id=ctx.run_id,
        version_id=ctx.version.version_id,
        split=split or instances[0].split,
        metric=ctx.task.metric.name,
        direction=ctx.task.metric.direction,
        value=ctx.task.aggregate([t.score for t in trajectories]),
        n=len(trajectories),
        n_errors=sum(t.error is not None for t in trajectories),
        seconds=time.monotonic() - start,
        seconds_per_item=statistics.fmean(t.seconds for t in trajectories),
        tokens_per_item=_tokens_per_item(trajectories),
        forced=forced,
        detail=_error_counts(trajectories),
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
    for t in trajectories:
        if t.error is not None:
            counts[t.error.kind.value] = counts.get(t.error.kind.value, 0) + 1
    return {"errors": counts}
