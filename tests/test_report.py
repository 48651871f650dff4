"""The report, progress lines and run-directory files, on stores built record by record (no
model, no sandbox)."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.config import RunConfig, load_config
from sialoop.progress import phase_bar, silence_third_party
from sialoop.records import (
    Decision,
    ErrorKind,
    Evaluation,
    Lever,
    RolloutError,
    RunInfo,
    Score,
    Trajectory,
    Version,
)
from sialoop.report import report_data, report_table
from sialoop.rundir import console_log, remove_scratch, write_run_files
from sialoop.runlock import RunLock
from sialoop.store import Store

runner = CliRunner()
BROKEN = "SyntaxError: invalid syntax (at v2.py:7)\n  File 'v2.py', line 7\n    def solve(:"
CRASH = "ZeroDivisionError: division by zero (at v0.py:3)\nTraceback (most recent call last):"


def _store(tmp_path: Path, status: str = "finished") -> Store:
    config = RunConfig().model_dump(mode="json") | {"task": "toy"}
    store = Store.create(tmp_path / "r", RunInfo(run_id="r", task="toy", config=config))
    store.set_run_status(status)
    return store


def _version(store: Store, g: int, status: str, **detail: object) -> Version:
    v = Version(
        version_id=f"v{g}",
        run_id="r",
        parent_id=None if g == 0 else "v0",
        generation=g,
        harness_path=f"harness/v{g}.py",
        status=status,
        note="" if status != "broken" else BROKEN.splitlines()[0],
        detail=dict(detail),
    )
    store.put_version(v)
    return v


def _trajectories(store: Store, vid: str, n: int, failed: int, split: str = "val") -> None:
    for i in range(n):
        error = RolloutError(kind=ErrorKind.crash, message=CRASH) if i < failed else None
        store.add_trajectory(
            Trajectory(
                run_id="r",
                version_id=vid,
                split=split,
                instance_id=f"i{i}",
                score=None if error else Score(value=1.0 if i % 2 else 0.0),
                error=error,
                seconds=0.5,
            )
        )
    value = None if failed == n else (n - failed) // 2 / n
    store.add_evaluation(
        Evaluation(
            run_id="r",
            version_id=vid,
            split=split,
            metric="accuracy",
            value=value,
            n=n,
            n_errors=failed,
            seconds=4.0,
            seconds_per_item=0.5,
            tokens_per_item=12.0,
            detail={"errors": {"crash": failed} if failed else {}},
        )
    )


def _decision(store: Store, g: int, lever: Lever, method: str | None = None) -> None:
    store.add_decision(
        Decision(run_id="r", generation=g, lever=lever, rationale=f"gen {g}", method=method)
    )


def _render(data: dict) -> str:
    out = Console(file=io.StringIO(), width=150, color_system=None)
    out.print(report_table(data))
    return out.file.getvalue()


def test_a_broken_candidate_appears_in_the_table_and_json(tmp_path: Path):
    store = _store(tmp_path)
    _version(store, 0, "accepted")
    _trajectories(store, "v0", 8, failed=0)
    _decision(store, 0, Lever.baseline)
    gate = {"verdict": "rejected", "p_value": 0.4321, "reason": "no gain"}
    _version(store, 1, "rejected", gate=gate)
    _trajectories(store, "v1", 8, failed=0)
    _decision(store, 1, Lever.weights, "sft")
    _version(store, 2, "broken", error=BROKEN)
    _decision(store, 2, Lever.harness)

    table = runner.invoke(app, ["report", str(store.root)])
    assert table.exit_code == 0, table.output
    lines = [line for line in _render(report_data(store)).splitlines() if " v2 " in line]
    assert lines and "broken" in lines[0] and "SyntaxError: invalid syntax" in lines[0]
    assert "harness" in lines[0]
    assert "weights sft" in table.output and "0.432" in table.output and "rejected" in table.output

    result = runner.invoke(app, ["report", str(store.root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    v2 = next(v for v in data["versions"] if v["version"] == "v2")
    assert v2["status"] == "broken" and v2["error"] == BROKEN and v2["lever"] == "harness"
    assert v2["error_line"] == BROKEN.splitlines()[0]
    v1 = next(v for v in data["versions"] if v["version"] == "v1")
    assert (v1["lever"], v1["method"], v1["p_value"], v1["verdict"]) == (
        "weights",
        "sft",
        0.4321,
        "rejected",
    )
    assert v1["scores"]["val"]["n"] == 8 and v1["scores"]["val"]["tokens_per_item"] == 12.0
    assert data["best"] == "v0" and [v["best"] for v in data["versions"]] == [True, False, False]
    assert data["clean"] and data["config"]["task"] == "toy" and data["wall_seconds"] >= 0
    for key in ("best_val", "best_holdout", "best_test", "evaluations", "status", "reason"):
        assert key in data


def test_a_harness_failing_on_every_item_is_visible(tmp_path: Path):
    store = _store(tmp_path)
    _version(store, 0, "accepted")
    _trajectories(store, "v0", 8, failed=8)
    _decision(store, 0, Lever.baseline)

    data = json.loads(runner.invoke(app, ["report", str(store.root), "--json"]).output)
    assert not data["clean"]
    assert data["failing"] == [
        {
            "version": "v0",
            "split": "val",
            "n": 8,
            "kind": "crash",
            "kinds": {"crash": 8},
            "example": "ZeroDivisionError: division by zero (at v0.py:3)",
        }
    ]
    (crash,) = data["errors"]
    assert crash["count"] == 8 and crash["where"] == {"v0 val": 8}
    assert data["versions"][0]["failed_everywhere_on"] == ["val"]
    assert data["versions"][0]["scores"]["val"]["all_failed"]

    text = runner.invoke(app, ["report", str(store.root)]).output
    assert "v0 val: 8/8 items failed — crash: ZeroDivisionError: division by zero" in text
    assert "accepted (all val failed)" in text and "errors by kind" in text
    assert "crash: 8 (v0 val 8)" in text


def test_a_rejected_candidate_failing_everywhere_is_shown_but_not_a_problem(tmp_path: Path):
    store = _store(tmp_path)
    _version(store, 0, "accepted")
    _trajectories(store, "v0", 8, failed=0)
    _version(store, 1, "rejected", gate={"verdict": "rejected", "p_value": 1.0})
    _trajectories(store, "v1", 8, failed=8)
    data = report_data(store)
    assert data["clean"] and data["failing"][0]["version"] == "v1"
    assert "rejected (all val failed)" in _render(data)


def test_some_failed_items_are_counted_but_the_run_stays_clean(tmp_path: Path):
    store = _store(tmp_path)
    _version(store, 0, "accepted")
    _trajectories(store, "v0", 8, failed=3)
    data = report_data(store)
    assert data["clean"] and data["errors"][0]["count"] == 3 and not data["failing"]
    assert data["versions"][0]["scores"]["val"]["errors"] == 3


def test_running_without_a_lock_holder_is_interrupted(tmp_path: Path):
    store = _store(tmp_path, status="running")
    with RunLock(store.root, "run"):
        assert report_data(store)["status"] == "running"
    data = report_data(store)
    assert data["status"] == "interrupted" and data["stored_status"] == "running"
    assert "resume" in data["reason"] and not data["clean"]
    assert "interrupted" in runner.invoke(app, ["report", str(store.root)]).output


def test_degraded_and_forced_scores_are_marked(tmp_path: Path):
    store = _store(tmp_path)
    _version(store, 0, "accepted")
    _trajectories(store, "v0", 4, failed=0)
    test = Evaluation(
        run_id="r", version_id="v0", split="test", metric="accuracy", value=0.5, n=4,
        n_errors=2, seconds=1.0, forced=True, infra_failures=2, degraded=True,
    )  # fmt: skip
    store.add_evaluation(test)
    data = report_data(store)
    scores = data["versions"][0]["scores"]
    assert scores["test"]["forced"] and scores["test"]["degraded"] and not scores["val"]["degraded"]
    assert data["evaluations"][-1]["infra_failures"] == 2
    assert not data["clean"] and "v0 test is degraded" in data["problems"][0]
    text = _render(data)
    assert "0.5000* degraded" in text and "forced re-score" in text


def _trajectory(score: float | None, error: bool = False, item: str = "i") -> Trajectory:
    return Trajectory(
        run_id="r",
        version_id="v3",
        split="val",
        instance_id=item,
        score=None if score is None else Score(value=score),
        error=RolloutError(kind=ErrorKind.timeout, message="t") if error else None,
        seconds=1.0,
    )


def _plain() -> Console:
    return Console(file=io.StringIO(), width=150, color_system=None)


def test_progress_in_a_log_prints_periodic_lines():
    console, now = _plain(), [0.0]
    assert not console.is_terminal
    with phase_bar(console, "v3 on val", 100, clock=lambda: now[0]) as advance:
        for i in range(100):
            now[0] += 0.1
            advance(_trajectory(1.0 if i % 2 else 0.0, error=i == 0))
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "v3 on val: 0/100, score -, errors 0, 0s"
    assert len(lines) == 11  # a start line, one every 10 items but the last, a final line
    # the failed item is an error, not a 0: the score is the mean of the 9 (then 99) scored
    assert lines[1].startswith("v3 on val: 10/100, score 0.556, errors 1, 1s, eta 9s")
    assert lines[-1] == "v3 on val: 100/100, score 0.505, errors 1, 10s done"
    console = _plain()
    with phase_bar(console, "v0 on val", 1) as advance:
        advance(_trajectory(None, error=True))
    assert console.file.getvalue().splitlines()[-1] == "v0 on val: 1/1, score -, errors 1, 0s done"


def test_progress_lines_come_every_30_seconds_on_a_slow_phase():
    console, now = _plain(), [0.0]
    with phase_bar(console, "gen 1: v0 on train", 1000, clock=lambda: now[0]) as advance:
        for _ in range(5):
            now[0] += 31.0
            advance(_trajectory(1.0))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 7 and "5/1000" in lines[5] and "eta" in lines[5]
    assert lines[-1].endswith("(stopped, 995 left)")


def test_a_reused_phase_shows_its_true_count_and_score():
    console = _plain()
    stored = [_trajectory(float(k == 0), item=f"i{k}") for k in range(4)]
    with phase_bar(console, "v3 on val", 4, stored=stored):
        pass
    assert console.file.getvalue() == "v3 on val: 4/4 reused, score 0.250\n"

    console = _plain()  # a trajectory stored twice (two writers) counts once
    with phase_bar(console, "v3 on val", 4, stored=[*stored, stored[0]]):
        pass
    assert console.file.getvalue() == "v3 on val: 4/4 reused, score 0.250\n"

    console = _plain()
    with phase_bar(console, "v3 on val", 6, stored=stored) as advance:
        advance(_trajectory(1.0))
        advance(_trajectory(1.0))
    last = console.file.getvalue().splitlines()[-1]
    assert last.startswith("v3 on val: 6/6 (4 reused), score 0.500, errors 0")


def test_a_terminal_bar_ends_with_a_line(tmp_path: Path):
    console = Console(file=io.StringIO(), force_terminal=True, width=150, color_system=None)
    with phase_bar(console, "v3 on val", 2, stored=[_trajectory(1.0, item="i0")]) as advance:
        advance(_trajectory(0.0))
    assert "v3 on val: 2/2 (1 reused), score 0.500, errors 0" in console.file.getvalue()


def test_silence_third_party_sets_what_later_imports_read(monkeypatch):
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    import warnings

    with warnings.catch_warnings():
        silence_third_party(verbose=True)
        assert "TRANSFORMERS_VERBOSITY" not in __import__("os").environ
        silence_third_party(verbose=False)
        assert __import__("os").environ["TRANSFORMERS_VERBOSITY"] == "error"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_third_party(verbose=False)  # filters go in front of "always"
            warnings.warn_explicit("noise", FutureWarning, "x.py", 1, module="transformers.x")
            warnings.warn_explicit("kept", FutureWarning, "x.py", 1, module="mine")
        assert [str(w.message) for w in caught] == ["kept"]


def test_run_files_round_trip_and_explain_the_directory(tmp_path: Path):
    store = _store(tmp_path)
    root = store.root
    config = RunConfig().model_dump(mode="json") | {"note": 'a "quoted"\nline', "x.y": 1.5e-05}
    write_run_files(root, config, "Task toy: pick the colour a text names.")
    back = tomllib.loads((root / "config.toml").read_text())

    def kept(tree: dict) -> dict:  # TOML has no None: such keys are left out, at any depth
        return {k: kept(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None}

    assert back == kept(config)
    assert back["policy"] == kept(config["policy"]) and "url" not in back["policy"]
    assert "task" not in back and back["x.y"] == 1.5e-05
    resolved = RunConfig().model_dump(mode="json") | {"task": "toy"}
    write_run_files(root, resolved, "Task toy.")
    assert load_config(root / "config.toml", {}).model_dump(mode="json") == resolved
    write_run_files(root, config, "Task toy: pick the colour a text names.")

    with RunLock(root, "run"), console_log(Console(file=io.StringIO()), root):
        (root / "scratch").mkdir()
        readme = (root / "README.md").read_text()
        for entry in root.iterdir():
            name = entry.name + ("/" if entry.is_dir() else "")
            assert f"`{name}`" in readme or entry.name.startswith("run.db-"), entry.name
    tables = ("runs", "versions", "trajectories", "llm_calls", "agent_calls", "evaluations")
    for table in (*tables, "decisions"):
        assert f"`{table}`" in readme
    assert "Task toy: pick the colour" in readme


def test_console_log_captures_printed_lines_as_plain_text(tmp_path: Path):
    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    with console_log(console, tmp_path) as path:
        console.print("[red]error:[/] something [bold]went[/] wrong")
        with phase_bar(console, "v0 on val", 1) as advance:
            advance(_trajectory(1.0))
    console.print("after the block")
    log = path.read_text()
    assert "error: something went wrong\n" in log and "\x1b" not in log
    assert "v0 on val: 1/1, score 1.000" in log and "after the block" not in log
    assert "\x1b" in console.file.getvalue()  # the terminal still got its colours
    assert "\n\n" not in log  # a live bar's refreshes leave no blank lines


def test_remove_scratch_keeps_only_what_is_named(tmp_path: Path):
    for name in ("sandbox-a/work-1/tmp", "sandbox-b", "setup-v3"):
        (tmp_path / "scratch" / name).mkdir(parents=True)
    (tmp_path / "scratch" / "sandbox-a" / "worker.log").write_text("x")
    removed = remove_scratch(tmp_path, keep=["setup-v3"])
    assert sorted(p.name for p in removed) == ["sandbox-a", "sandbox-b"]
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["setup-v3"]
    assert remove_scratch(tmp_path / "nothing-here") == []
