"""FolderTask on small SIA-layout folders written here: splits, labels, what public/ holds, scoring
through the folder's own evaluate.py, and generation 0 (the folder's reference agent, verbatim)
run in the sandbox against a real policy endpoint on the tiny random model."""

from __future__ import annotations

import ast
import csv
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sialoop.config import PolicyConfig
from sialoop.errors import DataError
from sialoop.harness.knobs import read_declarations
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.harness.worker import ADAPTER_HEADER, EPISODE_HEADER
from sialoop.policy.launch import serve_policy
from sialoop.policy.recorder import MemoryRecorder
from sialoop.records import ErrorKind
from sialoop.tasks import load_task
from sialoop.tasks.folder import FolderTask
from sialoop.tasks.folder_adapter import AgentFailed, anthropic_shim, run_reference_agent

CANARY = "private-canary-5e1d"
CLASSES = ["alpha", "beta", "gamma"]

# A reference agent in SIA's style: argparse, a hard-coded URL and model, a key from the
# environment, one client built at import (module-level) and one in main(); writes submission.csv.
AGENT = textwrap.dedent(
    '''
    #!/usr/bin/env python3
    """Tiny reference agent: one chat call per case."""
    import argparse
    import csv
    import json
    import os
    import sys
    from pathlib import Path

    import openai
    from openai import OpenAI

    BASE_URL = "https://api.example.invalid/v1"
    MODEL = "openai/gpt-oss-120b"
    MAX_TOKENS = 3
    NAMED_FIRST = False  # answer a class the text itself names, without asking the model
    KNOBS = {  # the author's order: what to try first
        "NAMED_FIRST": {"family": "extraction", "choices": [False, True]},
        "MAX_TOKENS": {"family": "sampling", "int": [1, 16]},
    }
    SCORER = openai.OpenAI(api_key="unused", base_url=BASE_URL)  # built at import time


    def main():
        parser = argparse.ArgumentParser()
        parser.add_argument("--dataset_dir", required=True)
        parser.add_argument("--working_dir", required=True)
        args = parser.parse_args()
        dataset, working = Path(args.dataset_dir), Path(args.working_dir)
        api_key = os.environ.get("TINY_API_KEY")
        if not api_key:
            print("TINY_API_KEY environment variable not set")
            sys.exit(1)
        client = OpenAI(api_key=api_key, base_url=BASE_URL)
        classes = json.loads((dataset / "classes.json").read_text())
        train = list(csv.DictReader(open(dataset / "train.csv"))) if (dataset / "train.csv").exists() else []
        rows = list(csv.DictReader(open(dataset / "test.csv")))
        predictions = []
        for row in rows:
            named = [c for c in classes if c in row["text"]]
            if NAMED_FIRST and named:
                predictions.append((row["id"], named[0]))
                continue
            shots = "".join(f"{r['text']} -> {r['label']}\\n" for r in train[:2])
            reply = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"{shots}{row['text']} ->"}],
                max_tokens=MAX_TOKENS, temperature=0.0,
            )
            SCORER.completions.create(model=MODEL, prompt=row["text"], max_tokens=1)
            text = reply.choices[0].message.content or ""
            predictions.append((row["id"], next((c for c in classes if c in text), classes[0])))
        with open(working / "submission.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label"])
            writer.writerows(predictions)
        sys.exit(0)


    if __name__ == "__main__":
        main()
    '''
).lstrip()

# An evaluator in SIA's style: TRUTH_PATH beside its own file, `evaluate(path) -> dict`, a CLI.
# It is lenient about case, so a test can tell it from exact matching.
EVALUATOR = textwrap.dedent(
    '''
    """Evaluate a submission against the private ground truth."""
    import argparse
    import csv
    from pathlib import Path

    TASK_DIR = Path(__file__).parent.parent.parent
    TRUTH_PATH = TASK_DIR / "data/private/test.csv"


    def evaluate(submission_path):
        truth = {r["id"]: r["label"] for r in csv.DictReader(open(TRUTH_PATH))}
        pred = {r["id"]: r["label"] for r in csv.DictReader(open(submission_path))}
        ok = [pred.get(i, "").strip().lower() == label.lower() for i, label in truth.items()]
        return {"accuracy": sum(ok) / len(ok), "n_correct": sum(ok), "n_total": len(ok)}


    def main():
        parser = argparse.ArgumentParser()
        parser.add_argument("--submission", type=Path)
        r = evaluate(parser.parse_args().submission)
        print(f"Accuracy : {r['accuracy']:.4f}  ({r['n_correct']}/{r['n_total']})")


    if __name__ == "__main__":
        main()
    '''
)


def _write_csv(path: Path, columns: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def _text(i: int) -> str:
    """Item i's text; it names its class, so a harness that reads it can beat the model."""
    return f"case {i}, a {CLASSES[i % 3]} one"


def make_folder(
    root: Path, *, training: bool, evaluator: bool = True, agent: str = AGENT, n: int = 12
) -> Path:
    public, private = root / "data" / "public", root / "data" / "private"
    public.mkdir(parents=True)
    (public / "task.md").write_text("# Tiny\n\nLabel each text alpha, beta or gamma.\n")
    (public / "classes.json").write_text(json.dumps(CLASSES))
    _write_csv(public / "test.csv", ["id", "text"], [[i, _text(i)] for i in range(n)])
    _write_csv(public / "sample_submission.csv", ["id", "label"], [[i, "alpha"] for i in range(n)])
    answers = [[i, CLASSES[i % 3], CANARY] for i in range(n)]
    _write_csv(private / "test.csv", ["id", "label", "note"], answers)
    if training:
        rows = [[i, f"train {_text(i)}", CLASSES[i % 3]] for i in range(20)]
        rows.append([20, _text(0), "alpha"])  # a copy of test item 0: dropped from train
        _write_csv(root / "data/training_data/train.csv", ["id", "text", "label"], rows)
        _write_csv(root / "data/training_data/test.csv", ["id", "text"], [[0, _text(0)]])
    if evaluator:
        (public / "evaluate.py").write_text(EVALUATOR)
    (root / "reference").mkdir()
    (root / "reference" / "reference_target_agent.py").write_text(agent)
    return root


@pytest.fixture
def plain(tmp_path: Path) -> FolderTask:
    return FolderTask(make_folder(tmp_path / "plain", training=False), seed=3)


@pytest.fixture
def trained(tmp_path: Path) -> FolderTask:
    return FolderTask(make_folder(tmp_path / "trained", training=True), val_fraction=0.25)


# -- splits and labels ---------------------------------------------------------------------------
def test_without_training_data_items_split_into_val_and_test_halves(plain: FolderTask, tmp_path):
    val, test = plain.instances("val"), plain.instances("test")
    assert plain.instances("train") == []
    assert len(val) == len(test) == 6
    assert {i.id for i in val} | {i.id for i in test} == {str(i) for i in range(12)}
    assert {i.id for i in val}.isdisjoint(i.id for i in test)
    assert val[0].inputs == {"text": _text(int(val[0].id))}  # no id, no label
    again = FolderTask(plain.layout.root, seed=3)
    assert [i.id for i in again.instances("val")] == [i.id for i in val]
    other = FolderTask(plain.layout.root, seed=4)
    assert [i.id for i in other.instances("val")] != [i.id for i in val]
    assert plain.label(val[0]) == CLASSES[int(val[0].id) % 3]
    with pytest.raises(PermissionError):
        plain.label(test[0])


def test_with_training_data_train_and_val_come_from_it(trained: FolderTask):
    train, val, test = (trained.instances(s) for s in ("train", "val", "test"))
    assert len(val) == 5 and len(test) == 12  # round(21 * 0.25); test is the public item file
    assert {i.id for i in train}.isdisjoint(i.id for i in val)
    assert "20" not in {i.id for i in train}  # its text is test item 0's: dropped
    assert len(train) == 21 - 5 - (0 if "20" in {i.id for i in val} else 1)
    assert trained.label(train[0]) == CLASSES[int(train[0].id) % 3]
    assert trained.summary()["test"] == 12


def test_load_task_reaches_the_folder(tmp_path: Path):
    task = load_task("ignored", tmp_path, task_dir=make_folder(tmp_path / "f", training=False))
    assert isinstance(task, FolderTask) and task.metric.name == "accuracy"


def test_missing_pieces_are_one_line_data_errors(tmp_path: Path):
    root = make_folder(tmp_path / "f", training=False)
    (root / "data" / "private" / "test.csv").unlink()
    with pytest.raises(DataError, match="shares ids") as err:
        FolderTask(root)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="nowhere"):
        FolderTask(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "data" / "public").mkdir(parents=True)
    (empty / "data" / "private").mkdir()
    with pytest.raises(DataError, match=r"task\.md"):
        FolderTask(empty)


# -- what the harness may read -------------------------------------------------------------------
def test_write_public_holds_no_private_file_and_no_val_or_test_label(trained: FolderTask, tmp_path):
    dest = tmp_path / "public"
    trained.write_public(dest)
    assert sorted(p.name for p in dest.iterdir()) == [
        "classes.json", "evaluate.py", "task.md", "train.csv"
    ]  # fmt: skip
    for path in dest.rglob("*"):
        assert CANARY.encode() not in path.read_bytes(), path
    rows = list(csv.DictReader((dest / "train.csv").open()))
    assert {r["id"] for r in rows} == {i.id for i in trained.instances("train")}
    assert all(
        r["label"] == trained.label(i)
        for r, i in zip(rows, trained.instances("train"), strict=True)
    )
    root = trained.layout.root
    assert set(trained.private_paths()) >= {root / "data/private", root / "data/training_data"}
    staging = trained.private_paths()[2]
    assert staging.is_dir() and staging.stat().st_mode & 0o077 == 0  # the evaluator's truth copies


def test_write_public_without_training_data_has_no_labels_at_all(plain: FolderTask, tmp_path):
    plain.write_public(tmp_path / "public")
    assert sorted(p.name for p in (tmp_path / "public").iterdir()) == [
        "classes.json", "evaluate.py", "task.md"
    ]  # fmt: skip


# -- scoring -------------------------------------------------------------------------------------
def test_scores_come_from_the_folders_evaluator(plain: FolderTask):
    item = plain.instances("val")[0]
    gold = plain.label(item)
    right = plain.score(item, {"label": gold.upper()})  # the evaluator ignores case
    assert right.value == 1.0 and right.correct
    assert right.detail["scorer"] == "evaluator" and right.detail["gold"] == gold
    assert right.detail["evaluator"]["n_total"] == 1  # its truth file held only this item
    assert right.detail["valid"] is False  # "ALPHA" is not in classes.json
    wrong = plain.score(item, next(c for c in CLASSES if c != gold))
    assert wrong.value == 0.0 and wrong.correct is False and wrong.detail["valid"]
    test_item = plain.instances("test")[0]
    scored = plain.score(test_item, {"label": "beta"})
    assert "gold" not in scored.detail and "evaluator" not in scored.detail
    assert scored.value == (1.0 if int(test_item.id) % 3 == 1 else 0.0)


def test_train_rows_are_scored_by_the_evaluator_too(trained: FolderTask):
    item = trained.instances("train")[0]
    score = trained.score(item, {"label": trained.label(item)})
    assert score.value == 1.0 and score.detail["evaluator"]["n_total"] == 1


def test_without_an_evaluator_scores_are_exact_matches(tmp_path: Path):
    task = FolderTask(make_folder(tmp_path / "f", training=False, evaluator=False))
    item = task.instances("val")[0]
    assert task.score(item, {"label": task.label(item)}).value == 1.0
    assert task.score(item, {"label": task.label(item).upper()}).value == 0.0
    assert task.score(item, {"label": task.label(item)}).detail["scorer"] == "exact_match"


def test_json_items_and_a_main_only_evaluator(tmp_path: Path):
    """GPQA's shape: JSON items with a typed id, answers as extra fields, an evaluator with
    only a CLI that writes results.json beside the submission."""
    root = tmp_path / "qa"
    public, private = root / "data" / "public", root / "data" / "private"
    public.mkdir(parents=True)
    private.mkdir()
    (public / "task.md").write_text("# QA\n")
    items = [{"id": i, "question": f"q{i}?", "options": {"A": "x", "B": "y"}} for i in range(6)]
    (public / "questions.json").write_text(json.dumps(items))
    truth = [it | {"correct_answer_letter": "AB"[i % 2], "Explanation": CANARY} for i, it in enumerate(items)]  # fmt: skip
    (private / "questions.json").write_text(json.dumps(truth))
    (public / "evaluate.py").write_text(textwrap.dedent(
        """
        import argparse, json
        from pathlib import Path

        def main():
            parser = argparse.ArgumentParser()
            parser.add_argument("--submission", type=Path)
            args = parser.parse_args()
            truth = json.loads((Path(__file__).resolve().parent.parent / "private/questions.json").read_text())
            answers = json.loads(args.submission.read_text())["answers"]
            ok = [answers.get(str(q["id"])) == q["correct_answer_letter"] for q in truth]
            (args.submission.parent / "results.json").write_text(json.dumps({"accuracy": sum(ok) / len(ok)}))
            print(f"Accuracy: {100 * sum(ok) / len(ok):.2f}%")
        """
    ))  # fmt: skip
    (root / "reference").mkdir()
    (root / "reference" / "agent.py").write_text("def main():\n    pass\n")
    task = FolderTask(root)
    item = task.instances("val")[0]
    gold = task.label(item)["correct_answer_letter"]
    assert task.score(item, {"submission": {"answers": {item.id: gold}}}).value == 1.0
    assert task.score(item, {"submission": {"answers": {item.id: "C"}}}).value == 0.0
    assert task.score(item, {"label": gold}).detail["scorer"] == "exact_match"
    view = ast.literal_eval(task.reference_harness().split("FOLDER_VIEW = ")[1].split("\n\n")[0])
    assert view["format"] == "json" and view["id_type"] == "int"


# -- generation 0 --------------------------------------------------------------------------------
def test_reference_harness_is_the_agent_verbatim_plus_solve(trained: FolderTask):
    source = trained.reference_harness()
    assert source.startswith(AGENT)
    tree = ast.parse(source)
    solve = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solve"]
    assert [a.arg for a in solve[0].args.args] == ["instance", "llm"]
    assert list(read_declarations(source).knobs) == ["NAMED_FIRST", "MAX_TOKENS"]  # its own
    assert "TINY_API_KEY" in source.split("FOLDER_VIEW = ")[1]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> Iterator[tuple[str, MemoryRecorder]]:
    recorder = MemoryRecorder()
    with serve_policy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"), recorder) as url:
        yield url, recorder


LIMITS = SandboxLimits(timeout_s=60.0, memory_mb=4096, startup_timeout_s=60.0)


def test_reference_agent_in_the_sandbox_reaches_the_policy(trained: FolderTask, tmp_path, policy):
    url, recorder = policy
    public, harness = tmp_path / "public", tmp_path / "v0.py"
    trained.write_public(public)
    harness.write_text(trained.reference_harness())
    item = trained.instances("test")[0]
    with Sandbox(
        harness, policy_url=url, adapter="base", limits=LIMITS, public_dir=public,
        scratch_root=tmp_path / "scratch", deny_read=tuple(trained.private_paths()),
    ) as sandbox:  # fmt: skip
        result = sandbox.solve(item.inputs | {"id": item.id}, "ep-folder-1")
    assert result.error is None, (result.error, result.logs)
    assert result.output["label"] in CLASSES
    calls = recorder.calls("ep-folder-1")
    assert sorted(c.endpoint for c in calls) == ["chat.completions", "completions"]
    assert all(c.adapter == "base" for c in calls)
    assert "train case" in str(calls[0].prompt)  # the agent read the public train rows
    assert trained.score(item, result.output).detail["scorer"] == "evaluator"


def test_a_harness_cannot_read_the_folders_private_data(trained: FolderTask, tmp_path):
    root = trained.layout.root
    harness = tmp_path / "peek.py"
    harness.write_text(textwrap.dedent(
        f"""
        from pathlib import Path

        def solve(instance, llm):
            if instance["id"] == "public":
                return Path("public/train.csv").read_text()[:2]
            return Path({str(root / "data" / "private" / "test.csv")!r}).read_text()
        """
    ))  # fmt: skip
    trained.write_public(tmp_path / "public")
    with Sandbox(
        harness, policy_url=None, adapter="base", limits=LIMITS, public_dir=tmp_path / "public",
        scratch_root=tmp_path / "scratch", deny_read=tuple(trained.private_paths()),
    ) as sandbox:  # fmt: skip
        denied = sandbox.solve({"id": "0"}, "ep-peek")
        allowed = sandbox.solve({"id": "public"}, "ep-ok")
    assert denied.error is not None and denied.error.kind == ErrorKind.forbidden
    assert CANARY not in denied.logs
    assert allowed.error is None and allowed.output == "id"


def _client(url: str, episode: str) -> openai.OpenAI:
    headers = {ADAPTER_HEADER: "base", EPISODE_HEADER: episode}
    return openai.OpenAI(base_url=url, api_key="sialoop", default_headers=headers)


def _view(task: FolderTask) -> dict:
    return ast.literal_eval(task.reference_harness().split("FOLDER_VIEW = ")[1].split("\n\n")[0])


def test_an_agent_that_fails_is_a_clear_error(plain: FolderTask, tmp_path, monkeypatch, policy):
    monkeypatch.chdir(tmp_path)
    plain.write_public(tmp_path / "public")
    item = plain.instances("val")[0]

    def exits() -> None:
        raise SystemExit(1)

    with pytest.raises(AgentFailed, match="exited with 1"):
        run_reference_agent(
            exits, {}, {"id": item.id, **item.inputs}, _client(policy[0], "e"), _view(plain)
        )
    with pytest.raises(AgentFailed, match=r"no submission\.csv"):
        run_reference_agent(
            lambda: None, {}, {"id": item.id}, _client(policy[0], "e"), _view(plain)
        )
    assert not list((tmp_path / "sialoop-folder").glob("working-*"))  # removed after each run


def test_the_anthropic_shim_speaks_to_the_policy(policy):
    url, recorder = policy
    shim = anthropic_shim(_client(url, "ep-claude"))()
    message = shim.messages.create(
        model="claude-haiku-4-5-20251001", max_tokens=3, system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    )  # fmt: skip
    assert message.content[0].type == "text" and message.stop_reason in ("end_turn", "max_tokens")
    (call,) = recorder.calls("ep-claude")
    assert call.endpoint == "chat.completions" and call.prompt[0]["content"] == "Be brief."
