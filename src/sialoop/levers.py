"""The two levers as strategy objects: each turns a Decision into a candidate Version.

`HarnessLever` asks the Meta-Agent for a new setting of the knobs the incumbent's harness
declares, validates the result (imports, signature, a smoke run on 3 train items) and archives
a broken one with its error. `WeightsLever` rolls the incumbent out on train items (k samples
each), builds the method's dataset from the stored trajectories and train labels, trains a LoRA
adapter (resumable; continuing the parent's adapter when it has one) and serves it.

Failures are data: `make_candidate` turns any error raised while making a candidate (a
proposal that does not fit, a trainer with nothing to learn, an endpoint that refuses the
adapter) into a broken Version carrying the error, so the run goes on.
"""

from __future__ import annotations

import difflib
import random
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from rich.console import Console

from sialoop.agents.base import EditRequest, HarnessWriter, MetaAgent, TriedSetting
from sialoop.agents.registry import meta_agent
from sialoop.agents.views import past_edits, trajectory_views
from sialoop.config import RunConfig
from sialoop.errors import PolicyError
from sialoop.harness.knobs import KnobError, read_declarations
from sialoop.harness.program import HarnessInvalid, validate_harness
from sialoop.policy.compute import run_compute
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
    levers: dict[str, Lever] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.levers:
            meta = meta_agent(self.cfg, self.store)
            self.levers = {"harness": HarnessLever(meta), "weights": WeightsLever()}

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


def _base(parent: Version, decision: Decision, version_id: str) -> Version:
    return Version(
        version_id=version_id,
        run_id=parent.run_id,
        parent_id=parent.version_id,
        generation=decision.generation,
        harness_path=parent.harness_path,
        adapter=parent.adapter,
    )


def broken(version: Version, error: str, **detail: Any) -> Version:
    return version.model_copy(
        update={
            "status": "broken",
            "note": version.note or error.splitlines()[0][:200],
            "detail": {**version.detail, **detail, "error": error},
        }
    )


def make_candidate(
    ctx: LoopContext, parent: Version, decision: Decision, version_id: str
) -> Version:
    """The lever's candidate; an error while making it becomes a broken candidate."""
    lever = ctx.levers[decision.lever.value]
    try:
        return lever.make(ctx, parent, decision, version_id)
    except Exception as err:
        kind = type(err).__name__
        tail = traceback.format_exc(limit=4)[-1500:]
        return broken(
            _base(parent, decision, version_id),
            f"{decision.lever.value} lever failed: {kind}: {err}",
            error_kind=kind,
            traceback=tail,
        )


def register_adapter(policy_url: str, name: str, path: str) -> None:
    """Serve a new adapter on the running endpoint, without a restart."""
    from sialoop.policy.launch import admin_headers

    base = policy_url.removesuffix("/v1")
    try:
        response = httpx.post(
            f"{base}/sialoop/adapters",
            json={"name": name, "path": path},
            headers=admin_headers(policy_url),  # the parent's secret: no harness has it
            timeout=120,
        )
    except httpx.HTTPError as err:
        raise PolicyError(f"policy endpoint unreachable at {base}: {err}") from err
    if response.status_code != 200:
        raise PolicyError(f"the endpoint refused adapter {name}: {response.text[:200]}")


def tried_settings(store: Store, sign: float) -> list[TriedSetting]:
    """Every harness version of the run with its knob values and oriented val score."""
    val = {e.version_id: e.value for e in store.evaluations("val") if not e.forced}
    out = []
    for v in store.versions():
        try:
            values = read_declarations(store.path(v.harness_path).read_text()).values
        except (KnobError, OSError):
            continue
        value = val.get(v.version_id) if v.status != "broken" else None
        out.append(
            TriedSetting(
                version_id=v.version_id,
                parent_id=v.parent_id,
                values=values,
                oriented_score=None if value is None else sign * value,
            )
        )
    return out


def _diff(old: str, new: str, old_path: str, new_path: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), old_path, new_path
        )
    )


def edit_request(ctx: LoopContext, parent: Version, decision: Decision) -> EditRequest:
    """What an LLM Meta-Agent is given: the task, the incumbent, the Decision, the incumbent's
    trajectories of this run's batches (train; val for a task without train) and past edits."""
    store, task, a = ctx.store, ctx.task, ctx.cfg.agents
    split = "train" if task.instances("train") else "val"
    trajectories = store.trajectories(parent.version_id, split)
    inputs = {i.id: i.inputs for i in task.instances(split)}
    val = {e.version_id: e.value for e in store.evaluations("val") if not e.forced}
    return EditRequest(
        generation=decision.generation,
        task_spec=task.spec(),
        metric=task.metric,
        parent_id=parent.version_id,
        parent_val=val.get(parent.version_id),
        source=store.path(parent.harness_path).read_text(),
        decision=decision,
        trajectories=trajectory_views(
            trajectories, task.metric, a.sample_trajectories, store=store, inputs=inputs
        ),
        n_trajectories=len(trajectories),
        edits=past_edits(store, a.history_edits),
    )


class HarnessLever:
    """The Meta-Agent's new harness, validated. A `HarnessWriter` (an LLM) writes code: its
    failed edit goes back to it once with the error, then its attempts are archived as broken
    versions (`<id>.llm1`, `<id>.llm2`) and its `fallback` makes the candidate, recorded in the
    candidate's `detail["llm"]`."""

    def __init__(self, meta: MetaAgent | HarnessWriter) -> None:
        self.meta = meta

    def make(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str
    ) -> Version:
        if isinstance(self.meta, HarnessWriter):
            return self._written(ctx, parent, decision, version_id, self.meta)
        return self._knobs(ctx, parent, decision, version_id, self.meta)

    def _knobs(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str,
        meta: MetaAgent,
    ) -> Version:  # fmt: skip
        store = ctx.store
        source = store.path(parent.harness_path).read_text()
        history = tried_settings(store, ctx.task.metric.sign)
        proposal = meta.propose(source, decision, history, parent.version_id)
        base = _base(parent, decision, version_id)
        if proposal is None:
            return broken(base, "no untried knob setting left (or the harness declares no knobs)")
        new = ctx.task.adapt_harness(meta.write(source, proposal))
        version = base.model_copy(
            update={
                "harness_path": store.write_harness(version_id, new),
                "note": proposal.why,
                "detail": {
                    "proposal": proposal.model_dump(mode="json"),
                    "knobs": proposal.assignments,
                    "why": proposal.why,
                    "diff": _diff(source, new, parent.harness_path, f"harness/{version_id}.py"),
                },
            }
        )
        return self._validated(ctx, version)

    def _written(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str,
        writer: HarnessWriter,
    ) -> Version:  # fmt: skip
        from sialoop.agents.edits import EditError
        from sialoop.agents.llm import LLMUnavailable

        request = edit_request(ctx, parent, decision)
        attempts: list[dict[str, Any]] = []
        error = ""
        for n, purpose in enumerate(("edit", "repair"), 1):
            attempt_id = f"{version_id}.llm{n}"
            try:
                if purpose == "edit":
                    new, why = writer.edit(request)
                else:
                    new, why = writer.repair(request, error)
            except EditError as err:
                error = f"the edit does not apply: {err}"
                attempts.append({"purpose": purpose, "error": error})
                continue
            except LLMUnavailable as err:
                attempts.append({"purpose": purpose, "error": str(err), "unavailable": True})
                break
            new = ctx.task.adapt_harness(new)
            diff = _diff(request.source, new, parent.harness_path, f"harness/{version_id}.py")
            llm = {"agent": writer.label, "purpose": purpose, "attempts": attempts}
            candidate = self._validated(
                ctx,
                _base(parent, decision, attempt_id).model_copy(
                    update={
                        "harness_path": ctx.store.write_harness(attempt_id, new),
                        "note": why,
                        "detail": {"why": why, "diff": diff, "llm": llm},
                    }
                ),
            )
            if candidate.status != "broken":
                return candidate.model_copy(
                    update={
                        "version_id": version_id,
                        "harness_path": ctx.store.write_harness(version_id, new),
                    }
                )
            ctx.store.put_version(candidate)  # archived with its error
            error = str(candidate.detail.get("error", ""))
            attempts.append({"purpose": purpose, "error": error, "version_id": attempt_id})
        fallback = self._knobs(ctx, parent, decision, version_id, writer.fallback)
        reason = attempts[-1]["error"] if attempts else "no attempt"
        return fallback.model_copy(
            update={
                "note": f"offline Meta-Agent (the LLM's edit failed): {fallback.note}"[:300],
                "detail": {
                    **fallback.detail,
                    "llm": {
                        "agent": writer.label,
                        "attempts": attempts,
                        "fallback": "offline",
                        "reason": reason[:1500],
                    },
                },
            }
        )

    def _validated(self, ctx: LoopContext, version: Version) -> Version:
        try:
            validate_harness(
                ctx.store.path(version.harness_path),
                public_dir=ctx.store.path("public"),
                isolation=ctx.cfg.sandbox.isolation,
            )
        except HarnessInvalid as err:
            return broken(version, str(err))
        items = ctx.task.instances("train")[:SMOKE_ITEMS] or ctx.task.instances("val")[:SMOKE_ITEMS]
        smoke = rollout(ctx.rollout_ctx(version), items)
        failed = [t.error for t in smoke if t.error is not None]
        if failed:
            return broken(version, f"smoke run: {failed[0].kind}: {failed[0].message[:300]}")
        return version


def _weights_attempt(store: Store, parent: Version, decision: Decision) -> int:
    """Earlier weights candidates of this method on this parent. A repeat draws other train
    items and another seed, so it never trains a byte-identical adapter again."""
    levers = {d.generation: d for d in store.decisions()}
    return sum(
        1
        for v in store.versions()
        if v.parent_id == parent.version_id
        and v.generation < decision.generation
        and (d := levers.get(v.generation)) is not None
        and d.lever is decision.lever
        and d.method == decision.method
    )


class WeightsLever:
    def make(
        self, ctx: LoopContext, parent: Version, decision: Decision, version_id: str
    ) -> Version:
        from sialoop.train import (
            LoraSettings,
            TrainSettings,
            dpo_pairs,
            grpo_groups,
            method,
            ppo_episodes,
            sft_examples,
        )

        cfg, store = ctx.cfg, ctx.store
        attempt = _weights_attempt(store, parent, decision)
        items = ctx.train_sample(cfg.loop.train_items, seed=cfg.seed + 7919 + 104729 * attempt)
        k = cfg.loop.samples if decision.method in ("grpo", "ppo") else 1
        title = f"{parent.version_id} on train (for {decision.method})"
        stored = store.stored_for(parent.version_id, items, k)
        with phase_bar(ctx.console, title, len(items) * k, stored) as bar:
            rollout(ctx.rollout_ctx(parent), items, bar, samples=k)
        build = {"grpo": grpo_groups, "dpo": dpo_pairs, "ppo": ppo_episodes}.get(
            decision.method or "", sft_examples
        )
        examples = build(store, ctx.task, parent.version_id)
        t = cfg.train
        init = (
            store.path(f"adapters/{parent.adapter}/adapter") if parent.adapter != "base" else None
        )
        settings = TrainSettings.model_validate(
            {
                "lr": t.lr,
                "batch_size": t.batch_size,
                "max_steps": t.max_steps,
                "max_len": t.max_len,
                "checkpoint_every": t.checkpoint_every,
                **{
                    k: getattr(t, k) for k in ("kl_coef", "beta", "gamma", "lam", "clip", "vf_coef")
                },
                "seed": cfg.seed + attempt,
                "dtype": resolve_dtype(cfg.policy.dtype),
                "init_adapter": str(init) if init is not None and init.is_dir() else None,
                **decision.settings,
            }
        )
        lora = LoraSettings(rank=t.rank, alpha=t.alpha, target_modules=t.target_modules)
        out_dir = store.path(f"adapters/{version_id}")
        summary = run_compute(  # the endpoint's thread: see sialoop.policy.compute
            method(decision.method or "sft").train,
            resolve_model_dir(cfg.policy), examples, out_dir, settings, lora, ctx.console,
        )  # fmt: skip
        register_adapter(ctx.policy_url, version_id, summary.adapter_dir)
        return _base(parent, decision, version_id).model_copy(
            update={
                "adapter": version_id,
                "note": f"{summary.method} on {summary.examples} examples, {summary.steps} steps"
                + (f", {summary.tokens_per_s:.0f} tokens/s" if summary.tokens_per_s else ""),
                "detail": {"training": summary.model_dump(mode="json"), "attempt": attempt},
            }
        )
