"""The generation loop: roll out the incumbent, let the Feedback-Agent pick a lever, make a
candidate, gate it on val. Every phase reads what the store already holds first, so `resume`
continues a killed run without redoing scored trajectories or losing an accepted version.

Failures are data: an agent's or a lever's error becomes a broken candidate carrying it (so a
resume finds it stored and never replays it); only a failure of the loop's own machinery stops
the run, which then ends with status `failed` and the reason (`interrupted` on Ctrl-C).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from sialoop import __version__
from sialoop.agents.base import Budget, FeedbackContext, History, Outcome
from sialoop.agents.registry import feedback_agent
from sialoop.config import RunConfig
from sialoop.evaluator import (
    best_version,
    evaluate_test,
    served_adapters,
    val_split,
    val_subset,
    widening_pool,
)
from sialoop.gate import GateResult, GateSettings, gate
from sialoop.harness.knobs import Declarations, KnobError, read_declarations
from sialoop.harness.program import HarnessInvalid, validate_harness
from sialoop.levers import LoopContext, broken, make_candidate
from sialoop.policy.external import WEIGHTS_OFF
from sialoop.policy.launch import serve_policy, trainable
from sialoop.preflight import finished_note
from sialoop.progress import phase_bar, spinner
from sialoop.records import Decision, Lever, RunInfo, Trajectory, Version
from sialoop.rollout import evaluate, rollout
from sialoop.rundir import console_log, remove_scratch, write_run_files
from sialoop.runlock import RunLock
from sialoop.sequential import plan, run_looks
from sialoop.store import Store
from sialoop.tasks import Instance, Task, task_for


def new_run(cfg: RunConfig, task: Task, run_id: str | None = None) -> Store:
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + task.name
    info = RunInfo(
        run_id=run_id,
        task=task.name,
        config=cfg.model_dump(mode="json"),
        sialoop_version=__version__,
    )
    store = Store.create(cfg.runs_dir / run_id, info)
    task.write_public(store.path("public"))
    write_run_files(store.root, info.config, str(task.summary()))
    return store


def generation_zero(store: Store, task: Task, cfg: RunConfig) -> Version:
    """Write and validate the first harness; a broken one stops the run with its error."""
    if store.versions():
        return store.version("v0")
    source = task.adapt_harness(
        cfg.harness.read_text() if cfg.harness else task.reference_harness()
    )
    version = Version(
        version_id="v0",
        run_id=store.run_info().run_id,
        parent_id=None,
        generation=0,
        harness_path=store.write_harness("v0", source),
        note="generation 0",
    )
    copy = store.path(version.harness_path)
    try:
        validate_harness(copy, public_dir=store.path("public"), isolation=cfg.sandbox.isolation)
    except HarnessInvalid as err:
        if cfg.harness is None:
            raise
        # the user fixes their own file, not the run's copy; a resume reads it again
        user = str(cfg.harness)
        message = str(err).replace(str(copy), user).replace(copy.name, cfg.harness.name)
        if user not in message:
            message = f"harness {user}: {message.removeprefix(cfg.harness.name + ': ')}"
        raise HarnessInvalid(message) from None
    store.put_version(version)
    return version


def _val(ctx: LoopContext, version: Version) -> list[Trajectory]:
    """The version's val trajectories, scoring what is missing (and storing the Evaluation)."""
    val = val_subset(ctx.task, ctx.cfg)
    if not any(e.version_id == version.version_id for e in ctx.store.evaluations("val")):
        stored = ctx.store.stored_for(version.version_id, val)
        with phase_bar(ctx.console, f"{version.version_id} on val", len(val), stored) as bar:
            evaluate(ctx.rollout_ctx(version), val, bar)
    ids = {i.id for i in val}
    return [t for t in ctx.store.trajectories(version.version_id, "val") if t.instance_id in ids]


def _val_on(ctx: LoopContext, version: Version, items: list[Instance]) -> list[Trajectory]:
    """The version's trajectories on the val subset and `items` beyond it (the adaptive gate's
    wider looks), scoring what is missing; only the subset's score is the version's Evaluation."""
    first = _val(ctx, version)
    extra = [i for i in items if i.id not in {t.instance_id for t in first}]
    if not extra:
        return first
    stored = ctx.store.stored_for(version.version_id, extra)
    title = f"{version.version_id} on {len(first) + len(extra)} val items (the gate widens)"
    with phase_bar(ctx.console, title, len(extra), stored) as bar:
        return first + rollout(ctx.rollout_ctx(version), extra, bar)


def gate_candidate(ctx: LoopContext, incumbent: Version, candidate: Version) -> GateResult:
    """The gate on the val subset; while undecided, again on more val items (both versions),
    at the nominal alpha of each planned look (sialoop/sequential.py)."""
    g, settings = ctx.cfg.gate, _gate_settings(ctx)
    first, pool = val_subset(ctx.task, ctx.cfg), widening_pool(ctx.task, ctx.cfg)
    seq = plan(len(first), len(first) + len(pool), g.widen_looks, g.alpha, g.spending, g.undecided)
    items = first + pool

    def look(n: int, nominal: float) -> GateResult:
        ids = {i.id for i in items[:n]}
        inc = [t for t in _val_on(ctx, incumbent, items[:n]) if t.instance_id in ids]
        cand = [t for t in _val_on(ctx, candidate, items[:n]) if t.instance_id in ids]
        result = gate(inc, cand, settings.model_copy(update={"alpha": nominal}), ctx.task.metric)
        if len(seq.looks) > 1:
            ctx.console.print(f"  look at {n} val items: {result.reason}", highlight=False)
        return result

    def undecided(result: GateResult, bound: float) -> bool:
        p_ni, always = result.p_noninferior, bound >= 1.0  # 1: every candidate not accepted
        return not result.degraded and (always or min(result.p_value, p_ni or 1.0) < bound)

    result, looks = run_looks(seq, look, lambda r: r.accepted, undecided)
    if len(seq.looks) == 1:
        return result
    reason = (
        f"{result.reason}; look {len(looks)} of {len(seq.looks)} (planned n "
        f"{'/'.join(map(str, seq.looks))}, {seq.spending} alpha spending, overall alpha "
        f"{seq.alpha:g})"
    )
    return result.model_copy(
        update={
            "reason": reason,
            "overall_alpha": seq.alpha,
            "planned": list(seq.looks),
            "looks": [
                {
                    "n": n,  # val items; n_paired counts the pairs (units for a "units" task)
                    "n_paired": r.n_paired,
                    "p_value": r.p_value,
                    "p_noninferior": r.p_noninferior,
                    "nominal_alpha": r.alpha,
                    "verdict": r.verdict,
                }
                for n, r in zip(seq.looks, looks, strict=False)
            ],
        }
    )


def history(store: Store, task: Task) -> History:
    versions = {v.version_id: v for v in store.versions()}
    val = {e.version_id: e.value for e in store.evaluations("val") if not e.forced}
    outcomes = []
    for d in store.decisions():
        v = versions.get(f"v{d.generation}")
        if d.generation == 0 or v is None or v.status == "candidate":
            continue
        gain = None
        if v.status != "broken" and v.version_id in val:
            gain = task.metric.gain(val[v.version_id], val.get(v.parent_id or ""))
        outcomes.append(
            Outcome(
                decision=d,
                accepted=v.status == "accepted",
                val_gain=gain,
                minutes=v.detail.get("minutes", 0.0),
            )
        )
    return History(outcomes=tuple(outcomes))


def _declarations(store: Store, version: Version) -> Declarations:
    try:
        return read_declarations(store.path(version.harness_path).read_text())
    except KnobError:
        return Declarations()


def _evidence_batch(ctx: LoopContext, g: int, incumbent: Version) -> list[Trajectory]:
    """The incumbent on a train batch, k samples each; a task with no train split (a folder
    without training data) shows the agent the incumbent's val trajectories, which the gate
    reads anyway."""
    cfg = ctx.cfg
    batch = ctx.train_sample(cfg.loop.train_batch, seed=cfg.seed + g)
    if not batch:
        return _val(ctx, incumbent)
    title = f"gen {g}: {incumbent.version_id} on train"
    stored = ctx.store.stored_for(incumbent.version_id, batch, cfg.loop.samples)
    with phase_bar(ctx.console, title, len(batch) * cfg.loop.samples, stored) as bar:
        return rollout(ctx.rollout_ctx(incumbent), batch, bar, samples=cfg.loop.samples)


def _decide(ctx: LoopContext, g: int, incumbent: Version, budget: Budget) -> Decision:
    stored = [d for d in ctx.store.decisions() if d.generation == g]
    if stored:
        return stored[-1]
    cfg, run_id = ctx.cfg, incumbent.run_id
    off = {} if trainable(cfg.policy) else {"weights": WEIGHTS_OFF}
    context = FeedbackContext(
        metric=ctx.task.metric,
        declarations=_declarations(ctx.store, incumbent),
        levers=tuple(lever for lever in cfg.loop.levers if lever not in off),
        samples=cfg.loop.samples,
        unavailable=off,
    )
    past = history(ctx.store, ctx.task)
    agent = feedback_agent(cfg, ctx.store)  # an unknown agent is a config error: the run stops

    def ask(call: Callable[[], Decision | None]) -> Decision | None:
        """The agent's answer; its failure is this generation's Decision and broken candidate
        (only the agent's own call is caught, never the loop's rollout)."""
        try:
            return call()
        except Exception as err:
            return _agent_failed(ctx, g, incumbent, err)

    decision = ask(
        lambda: agent.decide_before_rollout(past, budget, context, run_id=run_id, generation=g)
    )
    if decision is None:
        trajectories = _evidence_batch(ctx, g, incumbent)
        decision = ask(
            lambda: agent.decide(trajectories, past, budget, context, run_id=run_id, generation=g)
        ) or _agent_failed(ctx, g, incumbent, TypeError("decide() returned no Decision"))
    ctx.store.add_decision(decision)
    ctx.console.print(
        f"[bold]gen {g} decision:[/] {decision.lever.value}"
        f"{' (' + decision.method + ')' if decision.method else ''} — {decision.rationale}"
    )
    return decision


def _agent_failed(ctx: LoopContext, g: int, incumbent: Version, err: Exception) -> Decision:
    """The agent's failure as this generation's Decision and broken candidate."""
    decision = Decision(
        run_id=incumbent.run_id,
        generation=g,
        lever=Lever.harness,
        rationale=f"The Feedback-Agent failed ({type(err).__name__}: {err}); no candidate.",
        evidence={"rule": "agent_error", "error": traceback.format_exc(limit=4)[-1500:]},
    )
    candidate = Version(
        version_id=f"v{g}", run_id=incumbent.run_id, parent_id=incumbent.version_id,
        generation=g, harness_path=incumbent.harness_path, adapter=incumbent.adapter,
    )  # fmt: skip
    ctx.store.put_version(broken(candidate, decision.rationale))
    return decision


def _gate_settings(ctx: LoopContext) -> GateSettings:
    g = ctx.cfg.gate
    return GateSettings(
        alpha=g.alpha,
        min_gain=max(g.min_gain, ctx.task.noise_margin()),
        noninferiority_margin=g.noninferiority_margin,
        cheaper=g.cheaper,
        noise=ctx.task.noise if g.noise == "task" else g.noise,
        degraded_share=ctx.cfg.sandbox.degraded_share,
        seed=ctx.cfg.seed,
    )


def generation(ctx: LoopContext, g: int, budget: Budget) -> bool:
    """One generation; False when the Feedback-Agent decides to stop."""
    store, start = ctx.store, time.monotonic()
    incumbent = best_version(store)
    decision = _decide(ctx, g, incumbent, budget)
    if decision.lever is Lever.stop:
        return False
    vid = f"v{g}"
    existing = [v for v in store.versions() if v.version_id == vid]
    candidate = existing[0] if existing else make_candidate(ctx, incumbent, decision, vid)
    if candidate.status == "candidate":
        store.put_version(candidate)
        result = gate_candidate(ctx, incumbent, candidate)
        store.replace_decision(
            decision.model_copy(
                update={"evidence": {**decision.evidence, "gate_n": result.n_paired}}
            )
        )
        status = "accepted" if result.accepted else "rejected"
        ctx.console.print(f"  {vid} {status}: {result.reason}")
        candidate = candidate.model_copy(
            update={
                "status": status,
                "detail": {**candidate.detail, "gate": result.model_dump(mode="json")},
            }
        )
    elif candidate.status == "broken":
        ctx.console.print(f"  {vid} broken: {candidate.detail.get('error', '')[:300]}")
    elapsed = candidate.detail.get("minutes", 0.0) + (time.monotonic() - start) / 60
    store.put_version(
        candidate.model_copy(update={"detail": {**candidate.detail, "minutes": elapsed}})
    )
    return True


def _baseline(ctx: LoopContext) -> None:
    store = ctx.store
    _val(ctx, generation_zero(store, ctx.task, ctx.cfg))
    v0 = store.version("v0")
    if v0.status == "candidate":
        store.put_version(v0.model_copy(update={"status": "accepted"}))
        ev = next(e for e in store.evaluations("val") if e.version_id == "v0")
        store.add_decision(
            Decision(
                run_id=v0.run_id,
                generation=0,
                lever=Lever.baseline,
                rationale="generation 0: the task's reference harness on the base model",
                evidence={"val": ev.value, "n": ev.n, "errors": ev.n_errors},
            )
        )


def _loop(ctx: LoopContext) -> None:
    cfg, store = ctx.cfg, ctx.store
    _baseline(ctx)
    used = sum(v.detail.get("minutes", 0.0) for v in store.versions())
    started = time.monotonic() - used * 60
    first = max(v.generation for v in store.versions()) + 1
    if any(v.generation == first - 1 and v.status == "candidate" for v in store.versions()):
        first -= 1  # a candidate killed before its gate: finish it
    for g in range(max(1, first), cfg.loop.generations + 1):
        left = cfg.loop.minutes - (time.monotonic() - started) / 60
        budget = Budget(minutes_left=max(0.0, left), generations_left=cfg.loop.generations - g + 1)
        if not generation(ctx, g, budget):
            break


def _holdout(ctx: LoopContext) -> None:
    """The best version on val items the search never used, once, so overfitting shows."""
    held = val_split(ctx.task, ctx.cfg)[1]
    best = best_version(ctx.store)
    done = {e.version_id for e in ctx.store.evaluations("holdout")}
    if held and best.version_id not in done:
        title, stored = (
            f"{best.version_id} on the val holdout",
            ctx.store.stored_for(best.version_id, held),
        )
        with phase_bar(ctx.console, title, len(held), stored) as bar:
            evaluate(ctx.rollout_ctx(best), held, bar, split="holdout")


def drive(store: Store, task: Task, cfg: RunConfig, console: Console, lock: RunLock) -> Path:
    """Serve the policy, run (or continue) the loop, then score the best version on test, all
    under the run's lock (taken by the caller, released here). The run's status says how it
    ended: finished, failed (with the reason) or interrupted (Ctrl-C; `resume` continues)."""
    with lock:
        store.set_run_status("running")
        remove_scratch(store.root)  # what a killed process left behind
        try:
            with ExitStack() as stack:
                with spinner(console, "policy endpoint serving the base model"):
                    url = stack.enter_context(
                        serve_policy(cfg.policy, store, served_adapters(store))
                    )
                ctx = LoopContext(store, task, cfg, url, console)
                _loop(ctx)
                _holdout(ctx)
                if cfg.eval_test and not store.evaluations("test"):
                    evaluate_test(store, task, cfg, url, console)
                elif cfg.eval_test:
                    _test_note(store, console)
        except KeyboardInterrupt:
            store.set_run_status("interrupted", "stopped by the user (Ctrl-C)")
            console.print(
                f"[yellow]interrupted:[/] everything scored is kept; continue with "
                f"`sialoop resume {store.root}`",
                highlight=False,
            )
            raise
        except BaseException as err:
            store.set_run_status("failed", f"{type(err).__name__}: {err}"[:1000])
            raise
        finally:
            remove_scratch(store.root)
        store.set_run_status("finished")
    return store.root


def _test_note(store: Store, console: Console) -> None:
    """Test is scored once per run; a run continued past it may have a new best version."""
    scored, best = store.evaluations("test")[-1].version_id, best_version(store).version_id
    if scored != best:
        console.print(
            f"test holds {scored}'s score, taken before this run went on; the best is now "
            f"{best}: `sialoop eval {store.root} --split test --force` scores it (marked forced)",
            highlight=False,
        )


def run(
    cfg: RunConfig, console: Console, run_id: str | None = None, task: Task | None = None
) -> Path:
    """A new run (of `task`, when the caller already loaded it from `cfg`), driven to its end."""
    task = task or task_for(cfg)
    with spinner(console, f"task {task.name}: {task.summary()}"):
        store = new_run(cfg, task, run_id)
    lock = RunLock(store.root, "run").acquire()
    with console_log(console, store.root):
        console.print(f"run directory: {store.root}")
        return drive(store, task, cfg, console, lock)


def resume(
    root: Path, console: Console, data: Path | None = None, config: RunConfig | None = None
) -> Path:
    """Continue a stopped, killed or failed run; `config` (the stored one with the changes a
    resume may make) replaces the stored config for this and later resumes."""
    store = Store.open(root)
    lock = RunLock(store.root, "resume").acquire()  # refused at once if a writer is alive
    try:
        stored = RunConfig.model_validate(store.run_info().config)
        cfg = config or stored
        if data is not None:
            cfg = cfg.model_copy(update={"data": data})
        note = finished_note(store, cfg)
        if note is not None:
            console.print(note, highlight=False, soft_wrap=True)
            lock.release()
            return store.root
        task = task_for(cfg)
        if cfg != stored:
            store.set_run_config(cfg.model_dump(mode="json"))
            write_run_files(store.root, cfg.model_dump(mode="json"), str(task.summary()))
    except BaseException:
        lock.release()
        raise
    with console_log(console, store.root):
        console.print(f"resuming {store.root}")
        return drive(store, task, cfg, console, lock)
