"""Ctrl-C during a rollout: a real `sialoop run` gets SIGINT while its val phase waits on items
that cannot finish, and must end before the phase does (judged by the stored trajectory count,
not by a clock), marked `interrupted` and naming `sialoop resume`; the resume then completes
with every trajectory stored exactly once."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.store import Store

VAL_SIZE, HOLDOUT, TEST = 8, 3, 4
# The first item of each worker answers; later ones wait until the test creates GO (only before
# the resume), so without a working Ctrl-C the val phase could not end.
HARNESS = """
import os, time

GO = {go!r}
SEEN = []

def solve(instance, llm):
    SEEN.append(instance["id"])
    while len(SEEN) > 1 and not os.path.exists(GO):
        time.sleep(0.05)
    return {{"label": instance["options"][0]}}
"""


# The run as a user starts it from a terminal, where Ctrl-C raises KeyboardInterrupt. A test
# runner started in the background by a non-interactive shell (`make test &`, nohup, some CI)
# ignores SIGINT, and an ignored SIGINT stays ignored in its children: the run would then
# rightly ignore it too.
CLI_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'sialoop'; runpy.run_module('sialoop.cli', run_name='__main__')"
)


def _count(db: Path, split: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            sql = "SELECT count(*) FROM trajectories WHERE split = ?"
            return conn.execute(sql, (split,)).fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not written yet
        return 0


def test_sigint_in_a_rollout_stops_the_run_and_resume_completes(tmp_path, tiny_model_dir):
    go = tmp_path / "go"
    harness = tmp_path / "blocking.py"
    harness.write_text(HARNESS.format(go=str(go)))
    run = tmp_path / "i"
    args = [
        "run", "--task", "toy", "--runs-dir", str(tmp_path), "--run-id", "i",
        "--set", f"policy.model='{tiny_model_dir}'", "--set", "policy.dtype='float32'",
        "--set", f"harness='{harness}'", "--set", "loop.generations=0",
        "--set", f"split.val_size={VAL_SIZE}", "--set", f"split.holdout_size={HOLDOUT}",
        "--set", f"split.test_size={TEST}", "--set", "sandbox.workers=2",
        "--set", "sandbox.timeout_s=300",
        # the guard: its items wait on a marker file outside the run, which a namespace hides
        "--set", "sandbox.isolation='guard'",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_WITH_CTRL_C, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while _count(run / "run.db", "val") < 2:  # both workers answered once, then wait
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the val phase never started"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)  # only a hung run takes this long
        stopped_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, output
    assert _count(run / "run.db", "val") == 2 < VAL_SIZE, "the phase ran on after Ctrl-C"
    store = Store.open(run)
    assert store.run_info().status == "interrupted", (store.run_info(), output)
    assert "sialoop resume" in output, output
    assert "Traceback" not in output, output
    print(f"SIGINT to exit: {stopped_s:.2f} s; val trajectories stored: 2 of {VAL_SIZE}")
    store.close()

    go.touch()
    result = CliRunner().invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    store = Store.open(run)
    assert store.run_info().status == "finished"
    trajectories = store.trajectories()
    keys = Counter((t.version_id, t.split, t.instance_id, t.sample) for t in trajectories)
    assert max(keys.values()) == 1, "a trajectory was stored twice"
    by_split = Counter(t.split for t in trajectories)  # holdout items are val items
    assert by_split == {"val": VAL_SIZE + HOLDOUT, "test": TEST}, by_split
    n = {e.split: e.n for e in store.evaluations()}
    assert n == {"val": VAL_SIZE, "holdout": HOLDOUT, "test": TEST}, n
    assert all(t.error is None for t in trajectories)
