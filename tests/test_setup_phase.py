"""A harness's `setup` is not an item; the machine's failures are retried once and, beyond a
share, mark the evaluation degraded, on which the gate refuses to decide.

Real sandbox workers, no model: the harnesses never call the LLM. Times are set with wide
margins (setup several times longer than the per-item timeout, items that answer in
milliseconds) so a loaded machine cannot flip an outcome.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sialoop.config import SandboxConfig
from sialoop.gate import gate
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.records import ErrorKind, RolloutError, RunInfo, Score, Trajectory, Version
from sialoop.rollout import RolloutContext, evaluate, rollout
from sialoop.store import Store
from sialoop.tasks.toy import ToyTask

TIMEOUT_S = 2.0
SETUP_S = 1.5 * TIMEOUT_S  # longer than an item may take; busy-waited, so it costs CPU too

COMMON = """
import os, time
from pathlib import Path

SETUPS = 0
MODE = None
STATE = None

def _busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

def solve(instance, llm):
    if instance.get("hang"):
        time.sleep(3600)
    return {"label": instance["options"][0], "pid": os.getpid(), "setups": SETUPS, "mode": MODE,
            "fitted_by": STATE["fitted_by"] if STATE else None}
"""
SETUP_FRESH = f"""
def setup():
    global SETUPS, MODE
    SETUPS += 1
    MODE = "fresh"
    _busy({SETUP_S})
"""
SETUP_CACHED = f"""
from dataclasses import dataclass

@dataclass
class Fitted:  # a type of the harness's own: the cached state must load back in a new worker
    pid: int

def setup(cached):
    global SETUPS, MODE, STATE
    SETUPS += 1
    if cached is not None:
        MODE, STATE = "cached", {{"fitted_by": cached.pid}}
        return cached
    _busy({SETUP_S})
    MODE, STATE = "fresh", {{"fitted_by": os.getpid()}}
    return Fitted(os.getpid())
"""


def _harness(tmp: Path, body: str) -> Path:
    path = tmp / "harness.py"
    path.write_text(textwrap.dedent(COMMON + body))
    return path


def _ctx(tmp: Path, body: str, workers: int = 2, timeout_s: float = TIMEOUT_S) -> RolloutContext:
    store = Store.create(tmp / "run", RunInfo(run_id="r", task="toy", config={}))
    store.path("public").mkdir(exist_ok=True)
    (store.root / "h.py").write_text(textwrap.dedent(COMMON + body))
    version = Version(
        version_id="v0", run_id="r", parent_id=None, generation=0, harness_path="h.py"
    )
    # the guard: the retry test kills the worker by the pid its harness reports, which inside
    # a pid namespace is not the host's (tests/test_isolation.py covers the namespaces)
    sandbox = SandboxConfig(workers=workers, timeout_s=timeout_s, isolation="guard")
    return RolloutContext(store, ToyTask(seed=0), version, "http://127.0.0.1:9/v1", sandbox)


def _box(tmp: Path, body: str, **limits: float) -> Sandbox:
    return Sandbox(
        _harness(tmp, body),
        policy_url=None,
        adapter="base",
        limits=SandboxLimits(timeout_s=TIMEOUT_S, memory_mb=1024, **limits),
        scratch_root=tmp / "scratch",
    )


def _item(**extra: object) -> dict:
    return {"id": "1", "options": ["red", "blue"], **extra}


def test_setup_longer_than_the_item_timeout_is_scored_cleanly_once_per_worker(tmp_path):
    ctx = _ctx(tmp_path, SETUP_FRESH, workers=2)
    items = ctx.task.instances("val")[:6]
    evaluation = evaluate(ctx, items)
    trajectories = ctx.store.trajectories("v0", "val")
    assert len(trajectories) == 6
    for t in trajectories:
        assert t.error is None and t.score is not None, t.error
        assert t.seconds < TIMEOUT_S and t.attempts == 1
        assert t.output["setups"] == 1 and t.output["mode"] == "fresh"
    assert len({t.output["pid"] for t in trajectories}) <= 2  # one setup per worker
    assert not evaluation.degraded and evaluation.infra_failures == 0
    assert evaluation.n_errors == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("def setup():\n    raise ValueError('no weights here')\n",
         "setup failed (crash): ValueError: no weights here (at harness.py:"),
        ("def setup():\n    time.sleep(3600)\n", "setup did not finish within 1 s"),
        ("def setup():\n    os._exit(4)\n", "setup failed (killed): the worker exited with code 4"),
    ],
)  # fmt: skip
def test_a_failing_setup_fails_every_item_at_once_without_running_again(tmp_path, body, expected):
    with _box(tmp_path, body, setup_timeout_s=1.0) as box:
        results = [box.solve(_item(), f"ep-{i}") for i in range(4)]
        assert box.starts == 1  # setup ran once, not once per item
    for result in results:
        assert result.error.kind == ErrorKind.setup, result.error
        assert result.error.message.startswith(expected), result.error.message
        assert not result.error.infra and result.attempts == 1


def test_a_crashing_item_is_not_retried(tmp_path):
    with _box(tmp_path, "def setup():\n    pass\n") as box:
        result = box.solve({"id": "1"}, "ep-1")  # no "options": a KeyError in solve
        assert result.error.kind == ErrorKind.crash and result.attempts == 1
        assert box.starts == 1


@pytest.mark.parametrize("body", [SETUP_CACHED, SETUP_FRESH], ids=["warm", "re-setup"])
def test_a_restart_after_a_timeout_does_not_pay_setup_as_item_time(tmp_path, body):
    with _box(tmp_path, body) as box:
        first = box.solve(_item(), "ep-1")
        assert first.error is None, first.error
        assert first.output["mode"] == "fresh" and first.seconds < TIMEOUT_S
        hung = box.solve(_item(hang=True), "ep-2")  # a warm worker's timeout: the harness's
        assert hung.error.kind == ErrorKind.timeout and not hung.error.infra
        assert hung.attempts == 1
        after = box.solve(_item(), "ep-3")
        assert box.starts == 2
    assert after.error is None, after.error
    assert after.output["pid"] != first.output["pid"]
    assert after.seconds < TIMEOUT_S  # the new worker's setup was not on the item's clock
    if body is SETUP_CACHED:  # restored, not refitted: the state fitted by the first worker
        assert after.output["mode"] == "cached"
        assert after.output["fitted_by"] == first.output["pid"]
    else:
        assert after.output["mode"] == "fresh" and after.output["setups"] == 1


VICTIM = """
def setup():
    pass

def victim(instance):
    Path("started").write_text(str(os.getpid()))  # in the worker's own scratch dir
    deadline = time.monotonic() + 60
    while not os.path.exists(instance["go"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"label": instance["options"][0], "pid": os.getpid()}

_solve = solve
def solve(instance, llm):
    return victim(instance) if "go" in instance else _solve(instance, llm)
"""


def test_a_worker_killed_from_outside_is_retried_once_in_a_fresh_worker(tmp_path):
    go = tmp_path / "go"
    ctx = _ctx(tmp_path, VICTIM, workers=1, timeout_s=60.0)
    item = ctx.task.instances("val")[0]
    item = item.model_copy(update={"inputs": {**item.inputs, "go": str(go)}})
    killed: list[int] = []

    def kill_the_first_attempt() -> None:  # what the OOM killer does, from outside
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            started = list(ctx.store.path("scratch").glob("sandbox-*/work-*/started"))
            if started and started[0].read_text():
                killed.append(int(started[0].read_text()))
                os.kill(killed[0], signal.SIGKILL)
                go.touch()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_attempt)
    killer.start()
    (trajectory,) = rollout(ctx, [item])
    killer.join()
    assert killed, "the first attempt never started"
    assert trajectory.error is None and trajectory.score is not None, trajectory.error
    assert trajectory.attempts == 2 and trajectory.output["pid"] != killed[0]
    assert "attempt 1 failed (killed: the worker died of SIGKILL" in trajectory.logs
    assert "retried once in a fresh worker" in trajectory.logs
    assert ctx.store.trajectories("v0", "val") == [trajectory]


def test_timeouts_beyond_the_share_degrade_the_evaluation_and_the_gate_refuses(tmp_path):
    ctx = _ctx(tmp_path, "", workers=2, timeout_s=1.0)
    items = [
        i.model_copy(update={"inputs": {**i.inputs, "hang": True}})
        for i in ctx.task.instances("val")[:3]
    ]
    evaluation = evaluate(ctx, items)  # every item hangs on a fresh worker: twice, then infra
    trajectories = ctx.store.trajectories("v0", "val")
    assert len(trajectories) == 3
    for t in trajectories:
        assert t.error.kind == ErrorKind.timeout and t.error.infra and t.attempts == 2, t.error
    assert evaluation.degraded and evaluation.infra_failures == 3
    assert evaluation.detail["infra_errors"] == {"timeout": 3}

    clean = [t.model_copy(update={"error": None, "score": Score(value=1.0)}) for t in trajectories]
    result = gate(clean, trajectories)
    assert not result.accepted and result.degraded and result.test == "none"
    assert "candidate's val evaluation is degraded: 3 of 3 items (100%)" in result.reason
    assert "timeout 3" in result.reason
    assert gate(trajectories, clean).reason.startswith("rejected (no decision): the incumbent's")


def _traj(i: int, value: float, infra: bool = False) -> Trajectory:
    error = RolloutError(kind=ErrorKind.killed, message="SIGKILL", infra=True) if infra else None
    return Trajectory(
        run_id="r", version_id="v", split="val", instance_id=str(i), seconds=1.0,
        score=None if infra else Score(value=value), error=error,
    )  # fmt: skip


def test_infra_failures_up_to_the_share_leave_the_gate_deciding():
    incumbent = [_traj(i, 0.0) for i in range(20)]
    candidate = [_traj(i, 1.0, infra=i < 2) for i in range(20)]  # 10%: not above the share
    result = gate(incumbent, candidate)
    assert not result.degraded and result.accepted, result.reason
    candidate = [_traj(i, 1.0, infra=i < 3) for i in range(20)]  # 15%
    assert gate(incumbent, candidate).degraded
