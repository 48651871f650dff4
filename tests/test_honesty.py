"""A canary label planted in test never reaches anything the agents, the trainer or the harness
read: no run file, no stored prompt, decision, dataset or trajectory contains it, nor any prompt
sent to an LLM agent. The run is the answer-task loop of the LLM agents (toy, both levers, the
OpenAI-compatible client against a scripted loopback provider; tests/test_llm_agents.py has the
program-task one): each scripted failure ends as specified and the run goes on, and the API key
reaches the provider and nothing else."""

from pathlib import Path

import pytest
from rich.console import Console

from scripted_llm import Step, scripted_llm
from sialoop.config import load_config
from sialoop.loop import drive, new_run
from sialoop.records import Lever
from sialoop.runlock import RunLock
from sialoop.tasks.toy import ToyTask
from sialoop.train import sft_examples
from test_llm_agents import BROKEN_EDIT, KEY, MISMATCHED_EDIT, decision, prompt_of

CANARY = "zebra-canary-7f3a"


class CanaryToy(ToyTask):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self._rows["test"] = [(i, text, CANARY) for i, text, _ in self._rows["test"]]


def _n_examples_edit(body: dict) -> str:
    current = int(prompt_of(body).split("N_EXAMPLES = ", 1)[1].split("\n", 1)[0])
    new = 2 if current != 2 else 3
    return (
        f"WHY: {new} examples\n<<<<<<< SEARCH\nN_EXAMPLES = {current}\n=======\n"
        f"N_EXAMPLES = {new}\n>>>>>>> REPLACE\n"
    )


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory, tiny_model_dir: Path):
    """The run (its store and the agent requests the scripted provider saw)."""
    tmp_path = tmp_path_factory.mktemp("honesty")
    with pytest.MonkeyPatch.context() as monkeypatch, scripted_llm() as server:
        monkeypatch.setenv("SCRIPTED_KEY", KEY)
        agent = {
            "provider": "openai", "base_url": server.url + "/v1", "model": "scripted",
            "key_env": "SCRIPTED_KEY", "timeout_s": 5, "backoff_s": 0.01,
        }  # fmt: skip
        # gen 1: malformed JSON, then weights (SFT). gen 2: a 500 and a 429, then the harness;
        # the Meta-Agent's SEARCH matches nothing, its repair applies. gen 3: a hang, then the
        # harness; the Meta-Agent's harness fails validation twice: the offline agent writes.
        server.script(
            "feedback", "Sure! {lever: weights, method: sft}", decision("weights", method="sft"),
            Step(status=500), Step(status=429, headers={"retry-after-ms": "5"}), decision(),
            Step(hang_s=120), decision(),
        )  # fmt: skip
        server.script("meta", MISMATCHED_EDIT, _n_examples_edit, BROKEN_EDIT, BROKEN_EDIT)
        cfg = load_config(None, {
            "task": "toy", "runs_dir": str(tmp_path), "policy.model": str(tiny_model_dir),
            "policy.dtype": "float32", "loop.generations": 3, "loop.train_batch": 16,
            "loop.train_items": 32, "train.max_steps": 4, "train.batch_size": 8,
            "train.max_len": 256, "loop.levers": ["weights", "harness"],
            "loop.lever_patience": 1, "agents.meta": agent, "agents.feedback": agent,
        })  # fmt: skip
        task = CanaryToy()
        store = new_run(cfg, task, "r")
        drive(store, task, cfg, Console(quiet=True), RunLock(store.root, "run").acquire())
        requests = list(server.requests)
    return store, task, requests


def test_canary_test_label_is_never_seen(honest_run):
    store, task, requests = honest_run
    assert store.run_info().status == "finished"
    assert store.evaluations("test"), "the evaluator scored test"
    assert all(t.score is not None for t in store.trajectories(split="test"))

    for path in store.root.rglob("*"):  # run.db, harness files, public/, adapters, scratch
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
            assert KEY.encode() not in path.read_bytes(), path
    for call in store.llm_calls():
        assert CANARY not in str(call.prompt) and CANARY not in call.completion
    for decision_ in store.decisions():
        assert CANARY not in decision_.model_dump_json()
    for version in store.versions():
        assert CANARY not in version.model_dump_json()
        if version.generation == 0:
            assert all(CANARY not in e.model_dump_json() for e in sft_examples(store, task, "v0"))
    assert requests and all(CANARY not in str(r["body"]) for r in requests)  # every agent prompt
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in requests)

    calls, decisions = store.agent_calls(), {d.generation: d for d in store.decisions()}
    versions = {v.version_id: v for v in store.versions()}
    by = {(c.role, c.generation, c.purpose): c for c in calls}
    # gen 1: the malformed answer went back once with its error; the LLM pulled the weights
    assert decisions[1].lever is Lever.weights and decisions[1].method == "sft"
    assert decisions[1].evidence["agent"].startswith("llm (openai scripted")
    assert "not valid JSON" in by["feedback", 1, "retry"].messages[-1]["content"]
    assert versions["v1"].adapter == "v1" and versions["v1"].status != "broken"
    # gen 2: a 500 and a 429 were retried within one call; the mismatch went back for repair
    assert by["feedback", 2, "decide"].attempts == 3 and decisions[2].lever is Lever.harness
    assert "does not occur" in by["meta", 2, "repair"].messages[-1]["content"]
    assert versions["v2"].detail["llm"]["purpose"] == "repair"
    assert versions["v2"].status != "broken"
    # gen 3: the hang timed out and was retried; two broken harnesses were archived, and the
    # offline Meta-Agent made the generation's candidate, recorded as such
    hang = by["feedback", 3, "decide"]
    assert hang.attempts == 2 and hang.seconds >= 5
    assert versions["v3.llm1"].status == versions["v3.llm2"].status == "broken"
    v3 = versions["v3"]
    assert v3.detail["llm"]["fallback"] == "offline" and "knobs" in v3.detail
    assert v3.note.startswith("offline Meta-Agent") and v3.status != "broken"


SECRET = "sk-dashboard-canary-31f"
PLANTED = "planted-label-9c2e"


def _everything(client, run: str) -> str:
    """Every response the dashboard's API gives for `run`, concatenated."""
    parts = [client.get("/api/runs").text, client.get(f"/api/runs/{run}/summary").text]
    summary = client.get(f"/api/runs/{run}/summary").json()
    for g in sorted({v["generation"] for v in summary["versions"]}):
        parts.append(client.get(f"/api/runs/{run}/generations/{g}").text)
    offset = 0
    while True:
        page = client.get(f"/api/runs/{run}/trajectories", params={"offset": offset, "limit": 500})
        parts.append(page.text)
        for t in page.json()["items"]:
            parts.append(client.get(f"/api/runs/{run}/trajectories/{t['id']}").text)
        offset += 500
        if offset >= page.json()["total"]:
            return "\n".join(parts)


def test_the_dashboard_shows_the_run_live_and_exported(honest_run, browser, tmp_path: Path):
    """The LLM agents' answer-task run in a real browser: one point per candidate, the SFT
    candidate's loss curve, a harness diff, a trajectory's calls as a token heat map, a new
    generation appearing live, and the exported file; neither the API nor the file shows a
    secret from the config or a label a test score carries."""
    import shutil

    import httpx
    from typer.testing import CliRunner

    from browser import console_errors, rendered, serve, wait_for
    from sialoop.cli import app
    from sialoop.records import Decision, Score, Trajectory, Version
    from sialoop.store import Store

    store = honest_run[0]
    root = tmp_path / "runs" / "r"
    shutil.copytree(store.root, root)
    copy = Store.open(root)
    config = copy.run_info().config
    config["agents"]["meta"]["api_key"] = SECRET
    copy.set_run_config(config)
    copy.add_trajectory(
        Trajectory(run_id="r", version_id="v0", split="test", instance_id="planted", output="x",
                   score=Score(value=1.0, correct=True, detail={"gold": PLANTED}), seconds=0.1)
    )  # fmt: skip
    versions = copy.versions()
    trajectories = copy.trajectories()

    with serve(root.parent) as url:
        client = httpx.Client(base_url=url, timeout=60)
        everything = _everything(client, "r")
        assert SECRET not in everything and PLANTED not in everything and KEY not in everything
        assert CANARY not in everything
        summary = client.get("/api/runs/r/summary").json()
        assert [v["version"] for v in summary["versions"]] == [v.version_id for v in versions]
        assert [v["status"] for v in summary["versions"]] == [v.status for v in versions]
        assert sum(c["n"] for c in summary["trajectory_counts"]) == len(trajectories)
        ids, offset = [], 0  # pages of 7 give every trajectory once, in the store's order
        while offset < len(trajectories):
            page = client.get("/api/runs/r/trajectories", params={"offset": offset, "limit": 7})
            ids += [t["id"] for t in page.json()["items"]]
            offset += 7
        assert ids == [t.trajectory_id for t in trajectories]
        wrong = client.get("/api/runs/r/trajectories", params={"split": "val", "correct": False})
        expected = [
            t for t in trajectories if t.split == "val" and t.score and t.score.correct is False
        ]
        assert wrong.json()["total"] == len(expected) > 0
        gen1 = client.get("/api/runs/r/generations/1").json()
        (sft,) = [c for c in gen1["candidates"] if c["training"]]
        assert sft["training"]["losses"] == copy.version("v1").detail["training"]["losses"]
        assert sft["adapter_files"] and gen1["agent_calls"]
        gen2 = client.get("/api/runs/r/generations/2").json()
        assert gen2["candidates"][0]["diff"] == copy.version("v2").detail["diff"]
        assert client.get("/api/runs/..%2Fr/summary").status_code == 404

        browser.get(url + "#/run/r")
        rendered(browser, "run")
        points = browser.find_elements("css selector", "#score-chart .pt")
        assert sorted(p.get_attribute("data-version") for p in points) == sorted(
            v.version_id for v in versions
        )
        assert {p.get_attribute("data-status") for p in points} >= {"accepted", "broken"}
        browser.get(url + "#/run/r/gen/1")
        rendered(browser, "generation")
        assert browser.find_elements("css selector", "svg[aria-label=loss] path.series")
        browser.get(url + "#/run/r/gen/2")
        rendered(browser, "generation")
        assert browser.find_elements("css selector", "pre.diff span.add")
        assert browser.find_elements("css selector", "pre.diff span.del")
        with_calls = next(t for t in trajectories if copy.llm_calls(t.trajectory_id))
        calls = copy.llm_calls(with_calls.trajectory_id)
        browser.get(url + f"#/run/r/t/{with_calls.trajectory_id}")
        rendered(browser, "trajectory")
        assert len(browser.find_elements("css selector", ".llm-call")) == len(calls)
        tokens = sum(len(c.prompt_token_ids) + len(c.completion_token_ids) for c in calls)
        assert len(browser.find_elements("css selector", ".heat span")) == min(
            tokens, 4000 * len(calls)
        )
        assert calls[0].completion in browser.find_element("css selector", ".llm-call").text

        # live: a new generation written to the store appears without a reload
        browser.get(url + "#/run/r")
        rendered(browser, "run")
        marker = browser.execute_script("return window.performance.timeOrigin")
        copy.put_version(Version(version_id="v9", run_id="r", parent_id="v0", generation=4,
                                 harness_path=versions[0].harness_path, note="written live"))  # fmt: skip
        copy.add_decision(Decision(run_id="r", generation=4, lever="harness", rationale="live one"))
        wait_for(
            browser,
            lambda d: len(d.find_elements("css selector", "#score-chart .pt")) == len(versions) + 1,
        )
        assert "live one" in browser.find_element("css selector", "#decisions").text
        assert browser.execute_script("return window.performance.timeOrigin") == marker  # no reload
        assert not console_errors(browser)

    result = CliRunner().invoke(app, ["report", str(root), "--html", "--max-trajectories", "5"])
    assert result.exit_code == 0, result.output
    left_out = len(trajectories) - 5
    assert f"5 trajectories ({left_out} left out)" in result.output
    html = (root / "report.html").read_text()
    assert SECRET not in html and PLANTED not in html and KEY not in html
    browser.get((root / "report.html").as_uri())
    rendered(browser, "run")
    assert len(browser.find_elements("css selector", "#score-chart .pt")) == len(versions) + 1
    browser.get((root / "report.html").as_uri() + "#/run/r/traj")
    rendered(browser, "trajectories")
    assert f"{left_out} are left out" in browser.find_element("css selector", "main").text
    assert len(browser.find_elements("css selector", "#trajectories tbody tr")) == 5
    assert not console_errors(browser)
