"""The evaluator: the only code that scores the test split, once per run unless forced."""

from __future__ import annotations

from rich.console import Console

from sialoop.config import RunConfig
from sialoop.errors import StoreError
from sialoop.progress import phase_bar
from sialoop.records import Evaluation, Version
from sialoop.rollout import RolloutContext, evaluate
from sialoop.store import Store
from sialoop.tasks import Task


def best_version(store: Store) -> Version:
    """The incumbent: the latest accepted version scored on val.

    Every acceptance is a paired gate decision against the incumbent of its time, in the
    metric's direction (better beyond noise, or no worse and clearly cheaper), so the chain of
    accepted versions only improves by the gate's standard and its last link is the best. A
    higher raw val mean elsewhere in the chain is noise the gate already weighed.
    """
    found = store.incumbent()
    if found is None:
        raise StoreError(f"run {store.root} has no accepted version scored on val yet")
    return found


def evaluate_test(
    store: Store, task: Task, cfg: RunConfig, policy_url: str, console: Console, force: bool = False
) -> Evaluation:
    previous = store.evaluations("test")
    if previous and not force:
        last = previous[-1]
        raise StoreError(
            f"test was already scored for this run ({last.version_id}: {last.metric} "
            f"{last.value:.4f}, n={last.n}); pass --force to re-score (the report marks it)"
        )
    version = best_version(store)
    instances = task.instances("test")
    if cfg.split.test_size:
        instances = instances[: cfg.split.test_size]
    ctx = RolloutContext(store, task, version, policy_url, cfg.sandbox)
    with phase_bar(console, f"test ({version.version_id})", len(instances)) as advance:
        return evaluate(ctx, instances, advance, forced=bool(previous))
