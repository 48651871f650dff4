"""A run's life from the terminal: one writer per run (an OS lock a second process is refused
by, released when its holder dies), a true status, a finished run that says so, a run from
another schema refused in one line, and a repeated weights decision that trains differently.

One shared real run (toy task, tiny random model, the weights lever at both generations and a
gate that accepts nothing, so both candidates are children of v0) backs the tests."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.errors import StoreError
from sialoop.runlock import RunLock, holder, observed_status
from sialoop.store import DB_NAME, Store

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("lifecycle")
    args = [
        "run", "--task", "toy", "--runs-dir", str(tmp), "--run-id", "r",
        "--set", f"policy.model='{tiny_model_dir}'", "--set", "policy.dtype='float32'",
        "--set", "loop.generations=2", "--set", "loop.train_batch=4", "--set", "loop.train_items=6",
        "--set", "loop.minutes=100", "--set", "gate.alpha=1e-9", "--set", "split.val_size=6",
        "--set", "split.holdout_size=0", "--set", "split.test_size=4",
        "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.max_len=128",
        "--set", "agents.feedback='scripted_agents:always_weights'",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp / "r"


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name, ignore=shutil.ignore_patterns("run.lock"))
    return tmp_path / run.name


def test_a_repeated_weights_decision_trains_another_adapter(finished: Path):
    store = Store.open(finished)
    v1, v2 = store.version("v1"), store.version("v2")
    assert v1.status == v2.status == "rejected" and v1.parent_id == v2.parent_id == "v0"
    assert (v1.detail["attempt"], v2.detail["attempt"]) == (0, 1)
    weights = [
        (finished / f"adapters/{v}/adapter/adapter_model.safetensors").read_bytes()
        for v in ("v1", "v2")
    ]
    assert weights[0] != weights[1]


def test_resume_of_a_finished_run_says_so_and_does_nothing(finished: Path):
    before = len(Store.open(finished).evaluations())
    result = runner.invoke(app, ["resume", str(finished)])
    assert result.exit_code == 0, result.output
    assert "finished" in result.output and "nothing to" in result.output
    assert "resuming" not in result.output
    assert len(Store.open(finished).evaluations()) == before


def _hold(root: Path) -> subprocess.Popen[str]:
    """A real second process that takes the run's lock and says so on stdout."""
    code = (
        "import sys; from pathlib import Path; from sialoop.runlock import RunLock\n"
        f"RunLock(Path({str(root)!r}), 'run').acquire(); print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_one_writer_per_run_and_a_status_that_tells_a_dead_writer(finished: Path, tmp_path):
    run = _copy(finished, tmp_path)
    store = Store.open(run)
    store.set_run_status("running")  # as a driver leaves it while it works
    proc = _hold(run)
    try:
        assert holder(run) == f"pid {proc.pid} (run)"
        assert observed_status(run, "running", None) == ("running", None)
        for command in (["resume", str(run)], ["eval", str(run), "--split", "val"]):
            result = runner.invoke(app, command)
            assert result.exit_code == 2, result.output
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and f"in use by pid {proc.pid}" in lines[0], result.output
        with pytest.raises(StoreError, match="in use"):
            RunLock(run, "eval").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the dead holder's lock: the stored "running" is seen for what it is
    assert holder(run) is None
    status, reason = observed_status(run, "running", None)
    assert status == "interrupted" and "sialoop resume" in (reason or "")
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert Store.open(run).run_info().status == "finished"
    assert len(Store.open(run).evaluations("test")) == 1  # scored once, by the first writer


def test_a_run_from_another_schema_is_one_line(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    with sqlite3.connect(run / DB_NAME) as db:
        record = json.loads(db.execute("SELECT record FROM runs").fetchone()[0])
        record.update(schema_version=99, sialoop_version="9.9.0")
        db.execute("UPDATE runs SET record = ?", (json.dumps(record),))
    with pytest.raises(StoreError, match=r"written by 9\.9\.0 with record schema 99"):
        Store.open(run)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
