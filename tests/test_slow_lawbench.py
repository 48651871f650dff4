"""Generation 0 on LawBench with the real Gemma 3 270M (slow: `make test-slow`)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.store import Store

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "lawbench-sia").exists(), reason="../shared/data absent")
def test_lawbench_generation_zero_real_model(tmp_path: Path):
    args = [
        "run",
        "--task",
        "lawbench",
        "--data",
        str(DATA),
        "--runs-dir",
        str(tmp_path),
        "--run-id",
        "r",
        "--val-size",
        "12",
        "--set",
        "split.test_size=12",
        "--set",
        "split.holdout_size=12",
        "--set",
        "loop.generations=0",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "r")
    val = store.trajectories("v0", "val")
    # 12 val items scored per version, and 12 others the search never used (the holdout)
    assert len(val) == 24 and all(t.error is None for t in val)
    # a shortlisted charge every time, and each answer rests on recorded option scoring
    assert all(t.score is not None and t.score.detail["valid"] for t in val)
    call = store.llm_calls(val[0].trajectory_id)[0]
    assert call.prompt_token_ids[0] == 2 and call.prompt_token_ids.count(2) == 1  # one <bos>
    (test,) = store.evaluations("test")
    assert test.n == 12 and test.n_errors == 0
    (held,) = store.evaluations("holdout")
    assert held.n == 12 and held.version_id == "v0"
