"""One real 3-generation loop per kind of task, each asserting many things at once: a
free-form numeric task (arith), a lower-is-better program task scored in an isolated worker
(sortcost), an answer task loaded from a user's file (capitals) and SIA-layout folders. The
built-in toy loop runs here in the slow suite; the fast suite's toy loop is the honesty test's
(with the LLM agents). Generation 2 is scripted to pull the weights lever with a trainer that
fails (no completion fits its max_len, or there is no example to learn from), which must become
a broken candidate while the run goes on."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.config import RunConfig
from sialoop.evaluator import best_version, val_split
from sialoop.harness.knobs import read_declarations
from sialoop.store import Store
from sialoop.tasks import load_task
from test_generations import _count

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _args(tmp: Path, model: Path, run_id: str, task: str, *extra: str) -> list[str]:
    return [
        "run", "--task", task, "--runs-dir", str(tmp), "--run-id", run_id,
        "--set", f"policy.model='{model}'", "--set", "policy.dtype='float32'",
        "--set", "loop.generations=3", "--set", "loop.train_batch=6",
        "--set", "loop.train_items=8", "--set", "loop.lever_patience=1",
        "--set", "gate.alpha=0.3", "--set", "split.val_size=8", "--set", "split.holdout_size=3",
        "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.max_len=128",
        "--set", "agents.feedback='scripted_agents:weights_at_two'", "--set", "split.test_size=4",
        *extra,
    ]  # fmt: skip


# A folder without training data runs the loop in the slow suite; its task-level behaviour
# (val/test halves, labels private) is in the fast one (tests/test_folder_task.py).
KINDS = [
    "arith", "sortcost", "capitals", "folder",
    pytest.param("toy", marks=pytest.mark.slow),  # the fast suite's toy loop: test_honesty.py
    pytest.param("folder-untrained", marks=pytest.mark.slow),
]  # fmt: skip


@pytest.fixture(scope="module", params=KINDS)
def finished(request, tmp_path_factory, tiny_model_dir) -> tuple[str, Store]:
    tmp = tmp_path_factory.mktemp(request.param)
    task = {"capitals": f"{ROOT / 'examples/capitals.py'}:Capitals"}.get(
        request.param, request.param
    )
    # arith: an undecided candidate always widens (the adaptive gate's looks, asserted below)
    extra = ["--set", "gate.cheaper=0.9"] if request.param != "arith" else []
    if request.param == "arith":
        extra += ["--set", "gate.undecided=1.0"]
    if request.param == "capitals":  # and the Feedback-Agent itself fails at generation 3
        extra += ["--set", "agents.feedback='scripted_agents:fails_at_three'"]
    if request.param == "toy":  # enough SFT for the tiny model to learn colours, if chosen
        extra += ["--set", "train.max_steps=30", "--set", "train.lr=0.003"]
    args = _args(tmp, tiny_model_dir, "r", task, *extra)
    if request.param.startswith("folder"):
        from test_folder_task import make_folder

        folder = make_folder(tmp / "task", training=request.param == "folder")
        at = args.index("--task")
        args[at : at + 2] = ["--task-dir", str(folder), "--set", "split.val_fraction=0.4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return request.param, Store.open(tmp / "r")


def test_a_three_generation_loop_runs_on_each_kind_of_task(finished):
    name, store = finished
    info = store.run_info()
    assert info.status == "finished" and info.reason is None
    decisions = {d.generation: d for d in store.decisions()}
    assert set(decisions) >= {0, 1, 2, 3} or decisions[max(decisions)].lever.value == "stop"
    cfg = info.config
    task_dir = Path(cfg["task_dir"]) if cfg["task_dir"] else None
    task = load_task(
        cfg["task"] or "", None, task_dir=task_dir, val_fraction=cfg["split"]["val_fraction"]
    )
    metric = task.metric
    val = {e.version_id: e.value for e in store.evaluations("val")}
    versions = {v.version_id: v for v in store.versions()}

    # candidates come from the knobs the parent harness declares, inside their domains
    harness = [v for v in versions.values() if v.generation > 0 and "knobs" in v.detail]
    assert harness, [v.model_dump() for v in versions.values()]
    for v in harness:
        parent = versions[v.parent_id]
        declared = read_declarations(store.path(parent.harness_path).read_text()).knobs
        assert set(v.detail["knobs"]) <= set(declared)
        assert all(declared[k].contains(x) for k, x in v.detail["knobs"].items())
        assert v.detail["why"] and v.detail["diff"]

    # the scripted weights lever at generation 2 failed in the trainer: broken, run went on
    v2 = versions["v2"]
    assert decisions[2].lever.value == "weights"
    assert v2.status == "broken" and "weights lever failed" in v2.detail["error"], v2.detail
    assert 3 in decisions
    if name == "capitals":  # an agent's failure is a broken candidate, not a dead run
        assert decisions[3].evidence["rule"] == "agent_error"
        assert versions["v3"].status == "broken" and "RuntimeError" in versions["v3"].note

    # the gate read the metric's direction; the best version is the best by the metric
    widened = 0
    for v in versions.values():
        gate = v.detail.get("gate")
        if not gate:
            continue
        assert gate["direction"] == metric.direction
        assert decisions[v.generation].evidence["gate_n"] == gate["n_paired"]
        if v.status == "accepted" and gate["verdict"] == "better":
            assert gate["delta"] > 0 and gate["p_value"] < gate["alpha"], gate["reason"]
            if not gate["looks"] or len(gate["looks"]) == 1:
                assert metric.gain(val[v.version_id], val[v.parent_id]) > 0, gate["reason"]
        if v.status == "rejected":
            assert gate["verdict"] == "rejected"
        # the adaptive gate looked again only while undecided, at the planned n, within alpha
        looks = gate["looks"]
        for before, after in itertools.pairwise(looks):
            assert before["verdict"] == "rejected" and after["n"] > before["n"]
        if looks:
            assert [look["n"] for look in looks] == gate["planned"][: len(looks)]
            assert all(look["nominal_alpha"] < gate["overall_alpha"] for look in looks)
        widened += len(looks) > 1
    if name == "arith":
        assert widened, [v.detail.get("gate") for v in versions.values()]
    accepted = [v for v in versions.values() if v.status == "accepted"]
    best = best_version(store)
    if all((v.detail.get("gate") or {}).get("verdict") != "cheaper" for v in accepted):
        assert all(not metric.better(val[v.version_id], val[best.version_id]) for v in accepted)

    # cost beside score, and the holdout the search never used
    ev = next(e for e in store.evaluations("val") if e.version_id == "v0")
    assert ev.direction == metric.direction and ev.seconds_per_item > 0
    if len(task.instances("val")) > 8:
        (held,) = store.evaluations("holdout")
        assert held.version_id == best.version_id and held.n == 3
        held_ids = {i.id for i in val_split(task, RunConfig.model_validate(cfg))[1]}
        for v in versions.values():  # not even the adaptive gate's wider looks touch them
            seen = {t.instance_id for t in store.trajectories(v.version_id, "val")}
            assert seen >= held_ids if v.version_id == best.version_id else not seen & held_ids
    if name == "sortcost":
        assert metric.direction == "lower" and ev.tokens_per_item is not None
        assert len(accepted) >= 2, "a better sort algorithm was found"  # v0 and a better one
    if name == "folder":  # the agent's own knob: answer the class a text names, no model call
        better = [v for v in accepted if v.detail.get("knobs") == {"NAMED_FIRST": True}]
        assert better and val[better[0].version_id] == 1.0, [v.note for v in versions.values()]
        (cost,) = [e for e in store.evaluations("val") if e.version_id == better[0].version_id]
        assert cost.tokens_per_item == 0
    report = runner.invoke(app, ["report", str(store.root), "--json"])
    assert report.exit_code == 0 and '"best_holdout"' in report.output


@pytest.mark.slow  # fast-suite kill/resume: test_generations (toy) and test_train (each method)
def test_sigkill_during_a_program_task_then_resume(tmp_path: Path, tiny_model_dir: Path):
    args = [
        *_args(tmp_path, tiny_model_dir, "k", "sortcost", "--no-test"),
        "--set",
        "loop.generations=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sialoop.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    db = tmp_path / "k" / "run.db"
    deadline = time.monotonic() + 240
    while _count(db, "SELECT count(*) FROM trajectories WHERE split='train'") < 3:
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.trajectory_id: t for t in Store.open(tmp_path / "k").trajectories()}
    result = runner.invoke(app, ["resume", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "k")
    after = {t.trajectory_id: t for t in store.trajectories()}
    assert all(after[k] == v for k, v in before.items())
    assert store.run_info().status == "finished" and store.integrity_ok()
    assert {d.generation for d in store.decisions()} >= {0, 1}


SAMPLING_HARNESS = """
TEMPERATURE = 1.5
KNOBS = {"TEMPERATURE": {"family": "sampling", "float": [0.1, 2.0]}}


def solve(instance, llm):
    prompt = "Colour of " + instance["text"] + ":"
    text = llm.completions.create(
        model="policy", prompt=prompt, max_tokens=3, temperature=TEMPERATURE
    ).choices[0].text
    options = instance["options"]
    named = [o for o in options if o in text]
    return {"label": named[0] if named else options[sum(map(ord, text)) % len(options)]}
"""


def test_k_samples_make_groups_and_grpo_trains(tmp_path: Path, tiny_model_dir: Path):
    harness = tmp_path / "sampling.py"
    harness.write_text(SAMPLING_HARNESS)
    result = runner.invoke(app, [
        "run", "--task", "toy", "--runs-dir", str(tmp_path), "--run-id", "g", "--no-test",
        "--set", f"policy.model='{tiny_model_dir}'", "--set", "policy.dtype='float32'",
        "--set", f"harness='{harness}'", "--set", "loop.generations=1",
        "--set", "loop.levers=['weights']", "--set", "loop.samples=4",
        "--set", "loop.train_batch=8", "--set", "loop.train_items=8",
        "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.max_len=64",
        "--set", "split.holdout_size=0", "--set", "loop.minutes=100",  # GRPO's first guess: 40
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "g")
    train = store.trajectories("v0", "train")
    groups = Counter(t.instance_id for t in train)
    assert len(groups) >= 8 and set(groups.values()) == {4}  # the batch and the trainer's items
    assert {t.sample for t in train} == {0, 1, 2, 3}
    (decision,) = [d for d in store.decisions() if d.generation == 1]
    assert decision.lever.value == "weights" and decision.method == "grpo", decision.rationale
    v1 = store.version("v1")
    assert v1.detail["training"]["method"] == "grpo" and v1.detail["training"]["steps"] == 2
    assert v1.status in ("accepted", "rejected")


def test_the_dashboard_reads_each_kind_of_run(finished, browser):
    """`sialoop web RUN` on each kind: the API agrees with the store and with `report`, and the
    pages render in Chromium: one point per candidate, the broken candidate with its error,
    the harness program and a trajectory's measured figures."""
    import httpx

    from browser import console_errors, rendered, serve
    from sialoop.report import report_data

    name, store = finished
    versions, trajectories = store.versions(), store.trajectories()
    with serve(store.root) as url:  # one run directory: the dashboard shows that run only
        client = httpx.Client(base_url=url, timeout=60)
        assert [r["dir"] for r in client.get("/api/runs").json()] == ["r"]
        summary = client.get("/api/runs/r/summary").json()
        report = report_data(store)
        assert summary["best"] == report["best"] and summary["best_test"] == report["best_test"]
        assert summary["direction"] == store.evaluations("val")[0].direction
        assert [(v["version"], v["status"]) for v in summary["versions"]] == [
            (v.version_id, v.status) for v in versions
        ]
        by_kind = {e["kind"]: e["count"] for e in summary["errors"]}
        assert by_kind == {e["kind"]: e["count"] for e in report["errors"]}
        failed = client.get("/api/runs/r/trajectories", params={"error": "any"}).json()
        assert failed["total"] == sum(t.error is not None for t in trajectories)
        (v2,) = [v for v in summary["versions"] if v["version"] == "v2"]
        assert v2["status"] == "broken" and "weights lever failed" in v2["error"]

        browser.get(url + "#/run/r")
        rendered(browser, "run")
        assert len(browser.find_elements("css selector", "#score-chart .pt")) == len(versions)
        assert len(browser.find_elements("css selector", "#cost-chart .pt")) == len(versions)
        assert "weights lever failed" in browser.find_element("css selector", "#versions").text
        browser.get(url + "#/run/r/gen/1")
        rendered(browser, "generation")
        program = store.path(store.version("v1").harness_path).read_text()
        shown = browser.find_element("css selector", "details.program pre")
        assert shown.get_attribute("textContent") == program
        val = next(t for t in trajectories if t.split == "val" and t.score is not None)
        browser.get(url + f"#/run/r/t/{val.trajectory_id}")
        rendered(browser, "trajectory")
        text = browser.find_element("css selector", "main").text
        assert all(str(k) in text for k in val.score.detail), val.score.detail
        if name == "sortcost":  # a program task's output is shown as its program
            shown = browser.find_element("css selector", "pre.output-text")
            assert shown.get_attribute("textContent") == val.output["program"]
        assert not console_errors(browser)
