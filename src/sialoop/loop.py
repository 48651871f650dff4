"""The generation loop. Generation 0: the task's reference harness, scored on val as the
baseline; the best version is then scored once on test by the evaluator."""

from __future__ import annotations

import random
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from sialoop.config import RunConfig
from sialoop.evaluator import evaluate_test
from sialoop.harness.program import validate_harness
from sialoop.policy.launch import serve_policy
from sialoop.progress import phase_bar, spinner
from sialoop.records import Decision, Lever, RunInfo, Version
from sialoop.rollout import RolloutContext, evaluate
from sialoop.store import Store
from sialoop.tasks import Instance, Task, load_task


def val_subset(task: Task, cfg: RunConfig) -> list[Instance]:
    """The val items every version is scored on: a seeded sample of `split.val_size`."""
    val = task.instances("val")
    if cfg.split.val_size == 0 or cfg.split.val_size >= len(val):
        return val
    picked = random.Random(cfg.seed).sample(range(len(val)), cfg.split.val_size)
    return [val[i] for i in sorted(picked)]


def new_run(cfg: RunConfig, task: Task, run_id: str | None = None) -> Store:
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + task.name
    info = RunInfo(run_id=run_id, task=task.name, config=cfg.model_dump(mode="json"))
    store = Store.create(cfg.runs_dir / run_id, info)
    task.write_public(store.path("public"))
    return store


def generation_zero(store: Store, task: Task, cfg: RunConfig) -> Version:
    """Write and validate the first harness; a broken one stops the run with its error."""
    source = cfg.harness.read_text() if cfg.harness else task.reference_harness()
    version = Version(
        version_id="v0",
        run_id=store.run_info().run_id,
        parent_id=None,
        generation=0,
        harness_path=store.write_harness("v0", source),
        note="generation 0",
    )
    validate_harness(store.path(version.harness_path), public_dir=store.path("public"))
    store.put_version(version)
    return version


def run(cfg: RunConfig, console: Console, run_id: str | None = None) -> Path:
    """Create a run, score generation 0 on val, then (if configured) the best version on test."""
    task = load_task(cfg.task, cfg.data, seed=cfg.seed, val_fraction=cfg.split.val_fraction)
    with spinner(console, f"task {task.name}: {task.summary()}"):
        store = new_run(cfg, task, run_id)
    console.print(f"run directory: {store.root}")
    with ExitStack() as stack:
        with spinner(console, "policy endpoint serving the base model"):
            url = stack.enter_context(serve_policy(cfg.policy, store))
        version = generation_zero(store, task, cfg)
        ctx = RolloutContext(store, task, version, url, cfg.sandbox)
        val = val_subset(task, cfg)
        with phase_bar(console, "generation 0 on val", len(val)) as advance:
            baseline = evaluate(ctx, val, advance)
        store.put_version(version.model_copy(update={"status": "accepted"}))
        store.add_decision(
            Decision(
                run_id=ctx.run_id,
                generation=0,
                lever=Lever.baseline,
                rationale="generation 0: the task's reference harness on the base model",
                evidence={"val": baseline.value, "n": baseline.n, "errors": baseline.n_errors},
            )
        )
        if cfg.eval_test:
            evaluate_test(store, task, cfg, url, console)
    store.set_run_status("finished")
    return store.root
