"""The evaluator: the only code that scores the test split, once per run unless forced, and
the `eval` command's work (a split scored for the run's best version, under the run's lock).

Test scoring is transactional in the sense that matters here: only the holder of the run's
lock scores, and it checks for an earlier test score while holding it, so two processes can
never both score test."""

from __future__ import annotations

import random
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from sialoop.config import RunConfig
from sialoop.errors import ConfigError, StoreError
from sialoop.progress import phase_bar
from sialoop.records import Evaluation, Version
from sialoop.rollout import RolloutContext, evaluate
from sialoop.runlock import RunLock
from sialoop.store import Store
from sialoop.tasks import Instance, Task, task_for


def val_split(task: Task, cfg: RunConfig) -> tuple[list[Instance], list[Instance]]:
    """The val items every version is scored on (a seeded sample of `split.val_size`) and the
    holdout: up to `split.holdout_size` other val items, a seeded sample the search never sees."""
    val = task.instances("val")
    if cfg.split.val_size == 0 or cfg.split.val_size >= len(val):
        return val, []
    picked = set(random.Random(cfg.seed).sample(range(len(val)), cfg.split.val_size))
    rest = [i for i in range(len(val)) if i not in picked]
    held = random.Random(cfg.seed + 1).sample(rest, min(cfg.split.holdout_size, len(rest)))
    return [val[i] for i in sorted(picked)], [val[i] for i in sorted(held)]


def val_subset(task: Task, cfg: RunConfig) -> list[Instance]:
    return val_split(task, cfg)[0]


def widening_pool(task: Task, cfg: RunConfig) -> list[Instance]:
    """The val items outside the search's subset and the holdout, in a seeded order: what the
    adaptive gate adds, a prefix at a time, when a candidate is undecided."""
    val = task.instances("val")
    picked, held = val_split(task, cfg)
    used = {i.id for i in (*picked, *held)}
    rest = [i for i in val if i.id not in used]
    random.Random(cfg.seed + 2).shuffle(rest)
    if cfg.gate.widen_to:
        rest = rest[: max(0, cfg.gate.widen_to - len(picked))]
    return rest


def served_adapters(store: Store) -> dict[str, Path]:
    """Every trained adapter of the run, by name, to serve on the endpoint."""
    return {
        v.adapter: store.path(f"adapters/{v.adapter}/adapter")
        for v in store.versions()
        if v.adapter != "base" and store.path(f"adapters/{v.adapter}/adapter").is_dir()
    }


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


def refuse_repeated_test(store: Store) -> None:
    """Test is scored once per run: a second score is refused unless forced."""
    previous = store.evaluations("test")
    if previous:
        last = previous[-1]
        shown = "n/a" if last.value is None else f"{last.value:.4f}"
        raise StoreError(
            f"test was already scored for this run ({last.version_id}: {last.metric} "
            f"{shown}, n={last.n}); pass --force to re-score (the report marks it)"
        )


def evaluate_test(
    store: Store, task: Task, cfg: RunConfig, policy_url: str, console: Console, force: bool = False
) -> Evaluation:
    """The best version on test; the caller holds the run's lock. Scored once unless forced."""
    previous = store.evaluations("test")
    if not force:
        refuse_repeated_test(store)
    version = best_version(store)
    instances = task.instances("test")
    if cfg.split.test_size:
        instances = instances[: cfg.split.test_size]
    ctx = RolloutContext(store, task, version, policy_url, cfg.sandbox)
    stored = [] if previous else store.stored_for(version.version_id, instances)
    with phase_bar(console, f"test ({version.version_id})", len(instances), stored) as advance:
        return evaluate(ctx, instances, advance, forced=bool(previous))


def score_split(
    run_dir: Path,
    split: str,
    console: Console,
    force: bool = False,
    config: RunConfig | None = None,
) -> Evaluation:
    """`sialoop eval`: the best version on val or test, holding the run's lock. A bad split or a
    test already scored is refused before any model loads."""
    from sialoop.policy.launch import serve_policy

    if split not in ("val", "test"):
        raise ConfigError(f"--split {split}: use val or test")
    store = Store.open(run_dir)
    with RunLock(store.root, f"eval --split {split}"):
        cfg = config or RunConfig.model_validate(store.run_info().config)
        previous = store.evaluations(split)
        if split == "test" and not force:
            refuse_repeated_test(store)
        task = task_for(cfg)
        with ExitStack() as stack:
            url = stack.enter_context(serve_policy(cfg.policy, store, served_adapters(store)))
            if split == "test":
                return evaluate_test(store, task, cfg, url, console, force=force)
            version = best_version(store)
            done = [e for e in previous if e.version_id == version.version_id and not e.forced]
            if done and not force:
                return done[-1]  # val is scored once per version; --force re-scores it
            ctx = RolloutContext(store, task, version, url, cfg.sandbox)
            instances = val_subset(task, cfg)
            stored = [] if force else store.stored_for(version.version_id, instances)
            title = f"{version.version_id} on val"
            with phase_bar(console, title, len(instances), stored) as advance:
                return evaluate(ctx, instances, advance, forced=force)
