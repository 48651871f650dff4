"""Generation 0 end to end on the toy task: CLI, endpoint, sandbox, store, evaluator, report."""

import json
from pathlib import Path

from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.store import Store

runner = CliRunner()


def _run(tmp_path: Path, model: Path, *extra: str) -> Path:
    args = [
        "run",
        "--task",
        "toy",
        "--runs-dir",
        str(tmp_path),
        "--run-id",
        "r1",
        "--set",
        f"policy.model='{model}'",
        "--set",
        "policy.dtype='float32'",
        "--set",
        "sandbox.timeout_s=20",
        "--set",
        "loop.generations=0",
        *extra,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / "r1"


def test_generation_zero_then_test_once(tmp_path: Path, tiny_model_dir: Path):
    root = _run(tmp_path, tiny_model_dir)
    store = Store.open(root)
    (v0,) = store.versions()
    assert v0.status == "accepted"
    val = store.trajectories("v0", "val")
    assert len(val) == 16 and all(t.error is None for t in val)
    assert all(t.output["label"] in {"red", "green", "blue", "yellow"} for t in val)
    # every trajectory's LLM calls were recorded under its episode id by the endpoint
    calls = store.llm_calls(val[0].trajectory_id)
    assert calls and calls[0].adapter == "base" and calls[0].prompt_token_ids
    (ev_val,) = store.evaluations("val")
    assert ev_val.value == sum(t.score.value for t in val) / 16
    (ev_test,) = store.evaluations("test")
    assert ev_test.n == 16 and not ev_test.forced
    assert all(
        t.score is not None and "gold" not in t.score.detail
        for t in store.trajectories(split="test")
    )

    again = runner.invoke(app, ["eval", str(root), "--split", "test"])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["eval", str(root), "--split", "test", "--force"])
    assert forced.exit_code == 0, forced.output
    report = runner.invoke(app, ["report", str(root), "--json"])
    data = json.loads(report.output)
    assert [r["forced"] for r in data["evaluations"] if r["split"] == "test"] == [False, True]
    table = runner.invoke(app, ["report", str(root)])
    assert "forced re-score" in table.output


def test_crashing_harness_is_data_not_a_crash(tmp_path: Path, tiny_model_dir: Path):
    harness = tmp_path / "h.py"
    harness.write_text(
        "def solve(instance, llm):\n"
        "    if instance['id'].endswith('3'):\n"
        "        raise ValueError('bad luck')\n"
        "    return instance['options'][0]\n"
    )
    root = _run(tmp_path, tiny_model_dir, "--set", f"harness='{harness}'", "--no-test")
    store = Store.open(root)
    val = store.trajectories("v0", "val")
    failed = [t for t in val if t.error is not None]
    assert failed and all(t.error.kind == "crash" and "bad luck" in t.error.message for t in failed)
    assert all(t.score is None for t in failed)
    assert len(val) - len(failed) == sum(t.score is not None for t in val)
