"""The LLM agents on LawBench from the CLI with the shipped profile names (a scripted loopback
provider stands in for Anthropic and OpenAI: there is no internet here), and a real peer: the
project's own policy endpoint serving the embedded Gemma 3 270M as the Meta-Agent. A base
270M model writes no valid edit; that path must end in the offline agent, and the run must
finish. Slow: `make test-slow`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scripted_llm import scripted_llm
from sialoop.cli import app
from sialoop.store import Store
from test_llm_agents import KEY, decision, harness_of

runner = CliRunner()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _bump_first_int_knob(body: dict) -> str:
    """A generic edit: the first integer constant of the harness, plus one."""
    source = harness_of(body)
    line = re.search(r"^([A-Z][A-Z0-9_]*) = (\d+)$", source, re.MULTILINE)
    assert line, source[:400]
    new = f"{line.group(1)} = {int(line.group(2)) + 1}"
    return f"WHY: {new}\n<<<<<<< SEARCH\n{line.group(0)}\n=======\n{new}\n>>>>>>> REPLACE\n"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "lawbench-sia").exists(), reason="../shared/data absent")
def test_lawbench_runs_with_the_anthropic_and_openai_profiles(tmp_path, tiny_model_dir):
    small = [
        "--data", str(DATA), "--runs-dir", str(tmp_path), "--val-size", "12",
        "--set", f"policy.model='{tiny_model_dir}'", "--set", "policy.dtype='float32'",
        "--set", "split.test_size=12", "--set", "split.holdout_size=0",
        "--set", "loop.generations=2", "--set", "loop.train_batch=8",
        "--set", "loop.levers=['harness']",
    ]  # fmt: skip
    with scripted_llm() as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_BASE_URL", server.url + "/v1")
        mp.setenv("ANTHROPIC_BASE_URL", server.url)
        mp.setenv("OPENAI_API_KEY", KEY)
        mp.setenv("ANTHROPIC_API_KEY", KEY)
        server.defaults = {"feedback": decision(), "meta": _bump_first_int_knob}
        llm = runner.invoke(app, [
            "run", "--task", "lawbench", "--run-id", "llm", *small,
            "--set", "agents.meta=anthropic", "--set", "agents.feedback=openai",
        ])  # fmt: skip
    offline = runner.invoke(app, ["run", "--task", "lawbench", "--run-id", "offline", *small])
    assert llm.exit_code == 0, llm.output
    assert offline.exit_code == 0, offline.output
    store = Store.open(tmp_path / "llm")
    assert {c.role for c in store.agent_calls()} == {"meta", "feedback"}
    assert all(c.error is None for c in store.agent_calls())
    assert store.decisions()[1].evidence["agent"].startswith("llm (openai")
    assert "llm" in store.version("v1").detail
    assert not Store.open(tmp_path / "offline").agent_calls()


@pytest.mark.slow
def test_the_embedded_model_as_meta_agent_through_the_policy_endpoint(tmp_path, tiny_model_dir):
    from sialoop.policy.hf import HFBackend
    from sialoop.policy.model_files import embedded_model_dir
    from sialoop.policy.recorder import MemoryRecorder
    from sialoop.policy.server import PolicyServer

    with PolicyServer(HFBackend(embedded_model_dir(), dtype="float32"), MemoryRecorder()) as peer:
        config = tmp_path / "agents.toml"
        config.write_text(
            f'[agents.meta]\nprovider = "openai"\nmodel = "auto"\nbase_url = "{peer.url}"\n'
            "max_tokens = 96\ntimeout_s = 600\n"
        )
        result = runner.invoke(app, [
            "run", "--task", "toy", "--runs-dir", str(tmp_path), "--run-id", "r",
            "--config", str(config), "--set", f"policy.model='{tiny_model_dir}'",
            "--set", "policy.dtype='float32'", "--set", "loop.generations=2",
            "--set", "loop.levers=['harness']", "--set", "split.val_size=8",
        ])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "r")
    assert store.run_info().status == "finished"
    meta = store.agent_calls("meta")
    assert meta and all(c.error is None and c.model == "base" for c in meta)
    for v in store.versions():
        if v.generation > 0 and "." not in v.version_id:
            llm = v.detail["llm"]  # an edit of the 270M model, or the fallback, recorded
            assert llm.get("fallback") == "offline" or llm.get("purpose") in ("edit", "repair")
