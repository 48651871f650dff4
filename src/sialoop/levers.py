"""The two levers as strategy objects: each turns a Decision into a candidate Version.

`HarnessLever` asks the Meta-Agent for an operator edit of the incumbent's harness, validates
it (imports, signature, a smoke run on 3 train items) and archives a broken one with its error.
`WeightsLever` rolls the incumbent out on train items, builds the method's dataset from the
stored trajectories and train labels, trains a LoRA adapter (resumable) and serves it.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from typing import Protocol

import httpx
from rich.console import Console

from sialoop.agents.meta import OfflineMetaAgent
from sialoop.config import RunConfig
from sialoop.errors import PolicyError
from sialoop.harness.program import HarnessInvalid, validate_harness
from sialoop.policy.dtype import resolve_dtype
from sialoop.policy.launch import resolve_model_dir
from sialoop.progress import phase_bar
from sialoop.records import Decision, Version
from sialoop.rollout import RolloutContext, rollout
from sialoop.store import Store
from sialoop.tasks import Instance, Task

SMOKE_ITEMS = 3


@dataclass
class LoopContext:
    """What every phase of a generation needs."""

    store: Store
    task: Task
    cfg: RunConfig
    policy_url: str
    console: Console

    def rollout_ctx(self, version: Version) -> RolloutContext:
        return RolloutContext(self.store, self.task, version, self.policy_url, self.cfg.sandbox)

    def train_sample(self, n: int, seed: int) -> list[Instance]:
        train = self.task.instances("train")
        picked = random.Random(seed).sample(range(len(train)), min(n, len(train)))
        return [train[i] for i in sorted(picked)]


class Lever(Protocol):
    def make(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str
    ) -> Version:
        """A candidate (status candidate, or broken with its error in `detail`)."""
        ...


def register_adapter(policy_url: str, name: str, path: str) -> None:
    """Serve a new adapter on the running endpoint, without a restart."""
    base = policy_url.removesuffix("/v1")
    try:
        response = httpx.post(
            f"{base}/sialoop/adapters", json={"name": name, "path": path}, timeout=120
        )
    except httpx.HTTPError as err:
        raise PolicyError(f"policy endpoint unreachable at {base}: {err}") from err
    if response.status_code != 200:
        raise PolicyError(f"the endpoint refused adapter {name}: {response.text[:200]}")


class HarnessLever:
    def __init__(self) -> None:
        self.meta = OfflineMetaAgent()

    def make(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str
    ) -> Version:
        store = ctx.store
        source = store.path(parent.harness_path).read_text()
        tried = {
            v.detail.get("operator", "")
            for v in store.versions()
            if v.parent_id == parent.version_id
        }
        operator = self.meta.propose(source, decision, tried)
        base = Version(
            version_id=version_id,
            run_id=parent.run_id,
            parent_id=parent.version_id,
            generation=decision.generation,
            harness_path=parent.harness_path,
            adapter=parent.adapter,
        )
        if operator is None:
            return base.model_copy(update={"status": "broken", "note": "no operator left to try"})
        new = self.meta.write(source, operator)
        diff = "".join(
            difflib.unified_diff(
                source.splitlines(keepends=True),
                new.splitlines(keepends=True),
                parent.harness_path,
                f"harness/{version_id}.py",
            )
        )
        version = base.model_copy(
            update={
                "harness_path": store.write_harness(version_id, new),
                "note": operator.why,
                "detail": {"operator": operator.key, "why": operator.why, "diff": diff},
            }
        )
        return self._validated(ctx, version)

    def _validated(self, ctx: LoopContext, version: Version) -> Version:
        try:
            validate_harness(
                ctx.store.path(version.harness_path), public_dir=ctx.store.path("public")
            )
        except HarnessInvalid as err:
            return _broken(version, str(err))
        smoke = rollout(ctx.rollout_ctx(version), ctx.task.instances("train")[:SMOKE_ITEMS])
        failed = [t.error for t in smoke if t.error is not None]
        if failed:
            return _broken(version, f"smoke run: {failed[0].kind}: {failed[0].message[:300]}")
        return version


def _broken(version: Version, error: str) -> Version:
    return version.model_copy(
        update={"status": "broken", "detail": {**version.detail, "error": error}}
    )


class WeightsLever:
    def make(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str
    ) -> Version:
        from sialoop.train import (
            LoraSettings,
            TrainSettings,
            grpo_groups,
            method,
            sft_examples,
        )

        cfg, store = ctx.cfg, ctx.store
        items = ctx.train_sample(cfg.loop.train_items, seed=cfg.seed + 7919)
        with phase_bar(
            ctx.console, f"{parent.version_id} on train (for {decision.method})", len(items)
        ) as bar:
            rollout(ctx.rollout_ctx(parent), items, bar)
        build = grpo_groups if decision.method == "grpo" else sft_examples
        examples = build(store, ctx.task, parent.version_id)
        t = cfg.train
        settings = TrainSettings.model_validate(
            {
                "lr": t.lr,
                "batch_size": t.batch_size,
                "max_steps": t.max_steps,
                "max_len": t.max_len,
                "checkpoint_every": t.checkpoint_every,
                "seed": cfg.seed,
                "dtype": resolve_dtype(cfg.policy.dtype),
                **decision.settings,
            }
        )
        lora = LoraSettings(rank=t.rank, alpha=t.alpha, target_modules=t.target_modules)
        out_dir = store.path(f"adapters/{version_id}")
        summary = method(decision.method or "sft").train(
            resolve_model_dir(cfg.policy), examples, out_dir, settings, lora, ctx.console
        )
        register_adapter(ctx.policy_url, version_id, summary.adapter_dir)
        return Version(
            version_id=version_id,
            run_id=parent.run_id,
            parent_id=parent.version_id,
            generation=decision.generation,
            harness_path=parent.harness_path,
            adapter=version_id,
            note=f"{summary.method} on {summary.examples} examples, {summary.steps} steps",
            detail={"training": summary.model_dump(mode="json")},
        )


LEVERS: dict[str, Lever] = {"harness": HarnessLever(), "weights": WeightsLever()}
