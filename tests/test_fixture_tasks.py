"""The two small built-in tasks: arith (free-form numbers, an answer task) and sortcost (a
lower-is-better program task measured in an isolated worker), with their reference harnesses.

Sortcost programs run for real in sandbox workers; arith's template runs for real in a sandbox
against the tiny random Gemma behind a real policy endpoint (its answers are mostly wrong:
the test checks that they are well formed and scored, not that they are right).
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sialoop.config import PolicyConfig
from sialoop.harness.knobs import read_declarations
from sialoop.harness.program import validate_harness
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.policy.launch import serve_policy
from sialoop.policy.recorder import MemoryRecorder
from sialoop.records import ErrorKind, Trajectory
from sialoop.rollout import _score
from sialoop.tasks.arith import ArithTask, parse_number
from sialoop.tasks.base import Instance, Task
from sialoop.tasks.registry import resolve_task_class
from sialoop.tasks.sortcost import ProgramFailed, SortCostTask

# -- arith -------------------------------------------------------------------------------------


def test_arith_splits_are_seeded_unique_and_sized():
    a, b, other = ArithTask(seed=0), ArithTask(seed=0), ArithTask(seed=1)
    assert [len(a.instances(s)) for s in ("train", "val", "test")] == [32, 16, 16]
    for split in ("train", "val", "test"):
        assert a.instances(split) == b.instances(split)
    assert a.instances("train") != other.instances("train")
    questions = [i.inputs["question"] for s in ("train", "val", "test") for i in a.instances(s)]
    assert len(set(questions)) == len(questions)  # no test question in train or val
    assert resolve_task_class("arith") is ArithTask


def test_arith_labels_are_the_numbers_and_refuse_test():
    task = ArithTask()
    for inst in task.instances("train") + task.instances("val"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", inst.inputs["question"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert task.label(inst) == str(expected)
        assert "label" not in inst.inputs
    with pytest.raises(PermissionError):
        task.label(task.instances("test")[0])
    # an id from the test split presented as val is not a way round the refusal
    forged = Instance(id=task.instances("test")[0].id, split="val", inputs={})
    with pytest.raises(KeyError):
        task.label(forged)


@pytest.mark.parametrize(
    ("output", "parsed"),
    [
        ("42", "42"),
        (" 42\n", "42"),
        ("The answer is -3.", "-3"),
        ("42.0 apples", "42"),
        ("2.50", "2.5"),
        ("17 + 25 = 42", "17"),  # the first number wins
        ({"answer": "7 apples"}, "7"),
        ({"answer": 12}, "12"),
        (5, "5"),
        ({"label": "5"}, None),
        ("no number", None),
        ("", None),
        (None, None),
        (True, None),
        (["42"], None),
    ],
)
def test_arith_parses_the_first_number(output: Any, parsed: str | None):
    assert parse_number(output) == parsed


def test_arith_scores_honestly():
    task = ArithTask()
    val = task.instances("val")[0]
    gold = task.label(val)
    right = task.score(val, {"answer": f" {gold} is it", "votes": [gold]})
    assert (right.value, right.correct) == (1.0, True)
    assert right.detail == {"prediction": gold, "valid": True, "gold": gold}
    wrong = task.score(val, str(int(gold) + 1))
    assert (wrong.value, wrong.correct, wrong.detail["valid"]) == (0.0, False, True)
    none = task.score(val, {"answer": ""})
    assert none.value == 0.0 and none.detail["prediction"] is None and not none.detail["valid"]
    test = task.score(task.instances("test")[0], "1")
    assert "gold" not in test.detail
    assert task.metric.failure_value == 0.0 and task.metric.direction == "higher"


# -- sortcost ----------------------------------------------------------------------------------
FAST = SortCostTask(timeout_s=2.0)


def _instance(task: SortCostTask, n: int, order: str = "random") -> Instance:
    return next(
        i for i in task.instances("val") if i.inputs["n"] == n and i.inputs["order"] == order
    )


def _generator(tmp_path: Path, **knobs: Any) -> dict[str, Any]:
    path = tmp_path / "generator.py"
    path.write_text(FAST.reference_harness())
    module = runpy.run_path(str(path))
    module["program"].__globals__.update(knobs)
    return module


def _program(body: str) -> dict[str, str]:
    return {"program": textwrap.dedent(body)}


def test_sortcost_reference_program_scores_in_a_worker(tmp_path: Path):
    generator = _generator(tmp_path)
    inst = _instance(FAST, 16)
    output = generator["solve"](inst.inputs, None)  # no endpoint: no comment, same program
    score = FAST.score(inst, output)
    norm = 16 * 4  # n * log2(n)
    assert score.detail["comparisons"] == [120, 120, 120]  # bubble, no early exit: n(n-1)/2
    assert score.detail["units"] == {f"rep{k}": 120 / norm for k in range(3)}
    assert score.value == pytest.approx(120 / norm) and score.value > 0
    assert score.correct is None
    assert SortCostTask.noise == "units" and SortCostTask.metric.direction == "lower"
    assert SortCostTask.metric.failure_value is None
    assert resolve_task_class("sortcost") is SortCostTask


def test_sortcost_merge_beats_bubble(tmp_path: Path):
    inst = _instance(FAST, 32)
    bubble = FAST.score(inst, _generator(tmp_path)["solve"](inst.inputs, None))
    merge = FAST.score(inst, _generator(tmp_path, ALGORITHM="merge")["solve"](inst.inputs, None))
    assert merge.value < bubble.value
    assert FAST.metric.better(merge.value, bubble.value)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("def sort(items, less):\n    return sorted(items)\n", "TypeError"),
        ("def sort(items, less):\n    return items[0] < items[1]\n", "TypeError"),
        ("def sort(items, less):\n    return list(reversed(items))\n", "out of order"),
        ("def sort(items, less):\n    return items[1:]\n", "not a permutation"),
        ("def sort(items, less):\n    return [items[0]] * len(items)\n", "not a permutation"),
        ("def sort(items, less):\n    return [object()]\n", "not one of the items"),
        ("def sort(items, less):\n    return 3\n", "not a list"),
        ("def sort(items, less)\n", "SyntaxError"),
        ("SORT = None\n", "defines no sort"),
    ],
)
def test_sortcost_bad_programs_are_errors_never_scores(body: str, why: str):
    with pytest.raises(ProgramFailed, match=why):
        FAST.score(_instance(FAST, 8), _program(body))


def test_sortcost_a_slow_program_times_out():
    body = "import time\n\ndef sort(items, less):\n    time.sleep(30)\n"
    with pytest.raises(ProgramFailed, match="timeout"):
        FAST.score(_instance(FAST, 8), _program(body))


def test_sortcost_program_never_runs_in_the_parent():
    body = """
        import os
        STARTED = os.getpid()  # module level, too

        def sort(items, less):
            raise RuntimeError(f"pid={os.getpid()} loaded={STARTED}")
    """
    with pytest.raises(ProgramFailed, match="crash") as caught:
        FAST.score(_instance(FAST, 8), _program(body))
    pids = {int(p) for p in re.findall(r"(?:pid|loaded)=(\d+)", str(caught.value))}
    assert pids and os.getpid() not in pids
    assert "STARTED" not in globals() and "sortcost_program" not in sys.modules


def test_sortcost_an_output_without_a_program_is_refused():
    for output in (None, {}, {"program": "  "}, {"program": 3}, ["def sort(): ..."]):
        with pytest.raises(ValueError, match="no program"):
            FAST.score(_instance(FAST, 8), output)


def test_sortcost_failure_is_invalid_output_in_the_rollout_and_threads_are_safe(tmp_path):
    inst = _instance(FAST, 8)
    good = _generator(tmp_path, ALGORITHM="binary_insertion")["solve"](inst.inputs, None)
    bad = _program("def sort(items, less):\n    return sorted(items)\n")

    def scored(output: Any) -> Trajectory:
        base = Trajectory(
            run_id="r", version_id="v", split="val", instance_id=inst.id, output=output, seconds=0
        )
        return _score(FAST, inst, base)

    with ThreadPoolExecutor(2) as pool:  # the rollout scores from two threads
        ok, failed = pool.map(scored, [good, bad])
    assert ok.error is None and ok.score is not None and ok.score.value > 0
    assert failed.score is None and failed.error is not None
    assert failed.error.kind is ErrorKind.invalid_output


def test_sortcost_inputs_are_fresh_and_labels_refuse_test():
    task = SortCostTask()
    assert [len(task.instances(s)) for s in ("train", "val", "test")] == [12, 12, 12]
    assert task.label(task.instances("val")[0]) is None
    with pytest.raises(PermissionError):
        task.label(task.instances("test")[0])
    insertion = _program(
        """
        def sort(items, less):
            out = []
            for item in items:
                i = len(out)
                while i > 0 and less(item, out[i - 1]):
                    i -= 1
                out.insert(i, item)
            return out
        """
    )
    counts = FAST.score(_instance(FAST, 48), insertion).detail["comparisons"]
    assert len(set(counts)) > 1  # three different random inputs (equal by chance: ~never)


# -- templates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [ArithTask(), SortCostTask()], ids=["arith", "sortcost"])
def test_templates_declare_and_validate(task: Task, tmp_path: Path):
    source = task.reference_harness()
    declared = read_declarations(source)
    public = tmp_path / "public"
    task.write_public(public)
    path = tmp_path / "harness.py"
    path.write_text(source)
    validate_harness(path, public_dir=public)
    if isinstance(task, ArithTask):
        assert declared.families == ["sampling", "prompt"]
        assert declared.answer_key == "answer" and declared.signals["votes"].kind == "ranking"
    else:
        assert declared.families == ["algorithm", "tuning"]
        assert declared.values == {"ALGORITHM": "bubble", "EARLY_EXIT": False}
        assert declared.signals == {}


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> Iterator[tuple[str, MemoryRecorder]]:
    recorder = MemoryRecorder()
    with serve_policy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"), recorder) as url:
        yield url, recorder


@pytest.fixture
def public(tmp_path: Path) -> Path:
    ArithTask().write_public(tmp_path / "public")
    return tmp_path / "public"


def _harness(tmp_path: Path, source: str, **knobs: Any) -> Path:
    for name, value in knobs.items():
        source, found = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
        assert found == 1
    path = tmp_path / "harness.py"
    path.write_text(source)
    return path


def test_arith_template_runs_against_the_tiny_model(tmp_path, policy, public):
    url, recorder = policy
    task = ArithTask()
    harness = _harness(tmp_path, task.reference_harness(), N_SAMPLES=4, PROMPT="equation")
    limits = SandboxLimits(timeout_s=60, memory_mb=4096)
    instances = task.instances("val")[:2]
    with Sandbox(
        harness,
        policy_url=url,
        adapter="base",
        limits=limits,
        public_dir=public,
        scratch_root=tmp_path,
    ) as sandbox:
        results = [sandbox.solve(i.inputs | {"id": i.id}, f"ep-{i.id}") for i in instances]
    for inst, result in zip(instances, results, strict=True):
        assert result.error is None, result.error
        out = result.output
        assert isinstance(out["answer"], str) and isinstance(out["votes"], list)
        assert len(out["generations"]) == 4
        parsed = [parse_number(g) for g in out["generations"]]
        assert set(out["votes"]) == {p for p in parsed if p is not None}
        assert out["answer"] == (out["votes"][0] if out["votes"] else "")
        score = task.score(inst, out)
        assert score.value in (0.0, 1.0) and score.detail["gold"] == task.label(inst)
        calls = recorder.calls(f"ep-{inst.id}")
        assert len(calls) == 4  # one request with n=4: one recorded call per sample
        assert calls[0].prompt.endswith(inst.inputs["question"][8:-1] + " =")
        assert all(c.params.get("max_tokens") == 6 for c in calls)


def test_sortcost_template_asks_the_tiny_model_for_a_comment(tmp_path, policy):
    url, recorder = policy
    task = SortCostTask(timeout_s=5.0)
    harness = _harness(tmp_path, task.reference_harness(), ALGORITHM="merge")
    inst = _instance(task, 16)
    limits = SandboxLimits(timeout_s=60, memory_mb=4096)
    with Sandbox(
        harness, policy_url=url, adapter="base", limits=limits, scratch_root=tmp_path
    ) as sandbox:
        result = sandbox.solve(inst.inputs | {"id": inst.id}, "ep-sortcost")
    assert result.error is None, result.error
    assert len(recorder.calls("ep-sortcost")) == 1
    assert result.output["program"].startswith("# merge sort")
    assert task.score(inst, result.output).value < 1.0  # merge: under n·log2(n) comparisons
