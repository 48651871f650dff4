"""The run store on a real SQLite file: round trips and SIGKILL mid-transaction."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sialoop.errors import StoreError
from sialoop.records import (
    Decision,
    ErrorKind,
    Evaluation,
    Lever,
    LLMCall,
    RolloutError,
    RunInfo,
    Score,
    Trajectory,
    Version,
)
from sialoop.store import Store


def _call(episode: str, i: int) -> LLMCall:
    return LLMCall(
        episode_id=episode,
        endpoint="completions",
        adapter="base",
        prompt=f"p{i}",
        completion="c",
        prompt_token_ids=[2, 5],
        completion_token_ids=[7],
        token_logprobs=[None, -0.5, -1.25],
        params={"temperature": 0.0},
        latency_s=0.01,
    )


def test_round_trip(tmp_path: Path):
    store = Store.create(tmp_path / "r", RunInfo(run_id="r", task="toy", config={"seed": 1}))
    version = Version(
        version_id="v0", run_id="r", parent_id=None, generation=0, harness_path="harness/v0.py"
    )
    store.put_version(version)
    store.put_version(version.model_copy(update={"status": "accepted"}))
    ok = Trajectory(
        run_id="r",
        version_id="v0",
        split="val",
        instance_id="1",
        output="red",
        score=Score(value=1.0, correct=True, detail={"gold": "red"}),
        seconds=0.1,
    )
    bad = Trajectory(
        run_id="r",
        version_id="v0",
        split="val",
        instance_id="2",
        error=RolloutError(kind=ErrorKind.timeout, message="timed out after 1 s"),
        seconds=1.0,
    )
    store.add_trajectory(ok, [_call(ok.trajectory_id, 0), _call(ok.trajectory_id, 1)])
    store.add_trajectory(bad)
    store.record(_call("ep-other", 2))
    store.add_evaluation(
        Evaluation(
            run_id="r",
            version_id="v0",
            split="val",
            metric="accuracy",
            value=0.5,
            n=2,
            n_errors=1,
            seconds=1.1,
        )
    )
    store.add_decision(Decision(run_id="r", generation=0, lever=Lever.baseline, rationale="gen 0"))
    store.close()

    again = Store.open(tmp_path / "r")
    assert again.run_info().config == {"seed": 1}
    assert [v.status for v in again.versions()] == ["accepted"]
    assert again.trajectories("v0", "val") == [ok, bad]
    assert bad.score is None  # never computed is None, not 0
    assert len(again.llm_calls(ok.trajectory_id)) == 2
    assert again.llm_calls(ok.trajectory_id)[1].token_logprobs == [None, -0.5, -1.25]
    assert again.evaluations("val")[0].value == 0.5
    assert again.decisions()[0].lever is Lever.baseline
    assert again.integrity_ok()


def test_open_missing_and_create_twice(tmp_path: Path):
    with pytest.raises(StoreError, match="sialoop run"):
        Store.open(tmp_path / "nothing")
    Store.create(tmp_path / "r", RunInfo(run_id="r", task="toy", config={}))
    with pytest.raises(StoreError, match="already exists"):
        Store.create(tmp_path / "r", RunInfo(run_id="r", task="toy", config={}))


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sialoop.records import LLMCall, Trajectory
    from sialoop.store import Store

    store = Store.open(Path(sys.argv[1]))
    i = 0
    while True:
        t = Trajectory(run_id="r", version_id="v0", split="train", instance_id=str(i), seconds=0.0)
        calls = [LLMCall(episode_id=t.trajectory_id, endpoint="completions", adapter="base",
                         prompt="x" * 2000, completion="y", prompt_token_ids=list(range(300)),
                         completion_token_ids=[1], latency_s=0.0) for _ in range(5)]
        store.add_trajectory(t, calls)
        i += 1
        if i == 20:
            print("ready", flush=True)
""")


def test_sigkill_mid_transaction_leaves_consistent_db(tmp_path: Path):
    Store.create(tmp_path / "r", RunInfo(run_id="r", task="toy", config={})).close()
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "r")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = Store.open(tmp_path / "r")
    assert store.integrity_ok()
    trajectories = store.trajectories()
    assert len(trajectories) >= 20
    # Each transaction wrote one trajectory and its five calls: never a part of one.
    assert len(store.llm_calls()) == 5 * len(trajectories)
    for t in trajectories[:5]:
        assert len(store.llm_calls(t.trajectory_id)) == 5


def test_the_episode_shape_in_sql_agrees_with_the_call_records(tmp_path: Path):
    store = Store.create(tmp_path / "r", RunInfo(run_id="r", task="toy", config={}))
    sampled = _call("ep-1", 0).model_copy(
        update={"completion_token_ids": [7, 8, 9], "params": {"max_tokens": 8}}
    )
    scoring = _call("ep-1", 1).model_copy(update={"params": {"max_tokens": 0}})
    unset = _call("ep-1", 2)  # no max_tokens sent: the endpoint's default samples
    for call in (sampled, scoring, unset):
        store.record(call)
    assert scoring.scoring_only and not sampled.scoring_only and not unset.scoring_only
    calls = store.llm_calls("ep-1")
    assert store.episode_shape("ep-1") == (3, sum(c.sampled_tokens for c in calls)) == (3, 4)
    assert store.episode_shape("ep-none") == (0, 0)
