"""The TriMul kernel task on small shapes: the trusted runtime's verdicts (correct, invalid with
its reason, fresh inputs, a faked clock), the noise margin the gate applies, the task's config
defaults, the generator harness, and one real 2-generation loop that archives its versions."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.config import load_config
from sialoop.gate import GateSettings, gate
from sialoop.records import Score, Trajectory
from sialoop.store import Store
from sialoop.tasks.trimul import ProgramFailed, TriMulTask
from sialoop.tasks.trimul.reference import Case, check, generate_input, reference_kernel

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trimul" / "shapes.json"
runner = CliRunner()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A data root whose trimul/shapes.json keeps the real file's small test shapes, two of them
    standing in for the benchmarks (the real ones take minutes on 2 cores)."""
    rows = json.loads(SHARED.read_text())
    small = [r for r in rows["tests"] if r["seqlen"] <= 64]
    root = tmp_path_factory.mktemp("data")
    (root / "trimul").mkdir()
    picked = [small[0], next(r for r in small if r["distribution"] == "cauchy")]
    (root / "trimul" / "shapes.json").write_text(
        json.dumps(rows | {"tests": small, "benchmarks": picked})
    )
    return root


@pytest.fixture(scope="module")
def task(small_data, tmp_path_factory):
    t = TriMulTask(data=small_data, cache_dir=tmp_path_factory.mktemp("cache"), reps=2)
    yield t
    t.close()


def _template(task: TriMulTask) -> str:
    return task.adapt_harness(task.reference_harness())


def test_reference_harness_is_correct_and_measured(task: TriMulTask):
    assert {k: len(task.instances(k)) for k in ("train", "val", "test")} == {
        "train": 6, "val": 2, "test": 4 + 6,
    }  # fmt: skip
    source = _template(task)
    assert task.adapt_harness(source) == source  # it has a solve now: unchanged
    assert "def solve" not in task.reference_harness()
    inst = task.instances("train")[1]
    score = task.score(inst, {"program": source})
    d = score.detail
    assert (
        d["margin"] <= 1.0 and d["role"] == "timed" and d["shape"] == inst.inputs["case"]["label"]
    )
    assert len(d["times_s"]) == 2 and set(d["units"]) == {"rep0", "rep1"}
    # a timed kernel gets every CPU, not the one thread harness workers start with
    assert d["threads"] == task.threads == len(os.sched_getaffinity(0))
    assert score.value == pytest.approx(d["reference_median_s"] / d["median_s"])
    assert math.isclose(
        sum(d["units"].values()) / 2,
        sum(math.log(d["reference_median_s"] / t) for t in d["times_s"]) / 2,
    )
    # the same program is not measured twice: scores are cached by program hash
    assert task.score(inst, {"program": source}) is score
    # a check instance of test: correctness only, counted for validity, not in the mean
    check_inst = next(i for i in task.instances("test") if i.inputs["role"] == "check")
    checked = task.score(check_inst, {"program": source})
    assert checked.detail["role"] == "check" and "times_s" not in checked.detail
    assert task.aggregate([score, checked]) == pytest.approx(score.value)
    assert task.aggregate([score, None]) is None
    with pytest.raises(PermissionError):
        task.label(check_inst)


KNOB_SETTINGS = {
    "blocked float32": {"BLOCK": 1024},
    "blocked, every block": {
        "BLOCK": 1024, "PROJ": "fused", "LAYOUT": "channel_first", "INPLACE": True,
        "PROJ_DTYPE": "bf16x2", "TRI_DTYPE": "bfloat16", "OUT_DTYPE": "bf16x3", "CHUNK": 32,
    },
    "blocked, channel-last, separate": {"BLOCK": 1000, "PROJ_DTYPE": "bf16x3"},
    "whole-tensor splits": {"LAYOUT": "channel_first", "PROJ_DTYPE": "bf16x3", "CHUNK": 8},
}  # fmt: skip


@pytest.mark.parametrize("name", list(KNOB_SETTINGS))
def test_the_templates_blocks_compute_the_operator(task: TriMulTask, name: str):
    """In process, on a masked batch of two and on cauchy inputs: every block's output within
    tolerance (the float32 splits well within it), blocks that do not divide the rows too."""
    from sialoop.harness.operators import apply_assignments

    source = apply_assignments(task.reference_harness(), KNOB_SETTINGS[name])
    module: dict = {}
    exec(compile(source, "kernel.py", "exec"), module)
    for row in (
        {"seqlen": 64, "bs": 2, "dim": 256, "nomask": False, "distribution": "normal"},
        {"seqlen": 32, "bs": 1, "dim": 128, "nomask": True, "distribution": "cauchy"},
    ):
        data = generate_input(Case(hiddendim=128, **row), seed=7)
        margin, why = check(module["custom_kernel"](data), reference_kernel(data))
        assert why is None and margin < 0.6, (name, row, margin)


RESULT = "_linear(t.view(rows, h), wo, OUT_DTYPE, first=False).view(b, n, n, c)"
KERNEL_TAIL = f"return {RESULT}"
BAD = {
    "wrong values": (KERNEL_TAIL, f"{KERNEL_TAIL} * 1.1", "tolerance"),
    "NaNs": (KERNEL_TAIL, f"{KERNEL_TAIL} * float('nan')", "NaN positions"),
    "wrong shape": (KERNEL_TAIL, f"return ({RESULT})[..., :-1]", "output shape"),
    "not a tensor": (KERNEL_TAIL, "return 'done'", "not a tensor"),
    "crash": (KERNEL_TAIL, "raise RuntimeError('boom')", "boom"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_wrong_kernel_is_invalid_with_its_reason(task: TriMulTask, name: str):
    old, new, why = BAD[name]
    source = _template(task).replace(old, new)
    inst = task.instances("train")[0]
    with pytest.raises(ProgramFailed, match=why) as err:
        task.score(inst, {"program": source})
    if name != "crash":
        assert inst.inputs["case"]["label"] in str(err.value)


CACHING = """
from sialoop.tasks.trimul.reference import reference_kernel
_SEEN = {}

def custom_kernel(data):
    key = tuple(data[0].shape)  # the shape alone: every later call gets the first output
    if key not in _SEEN:
        _SEEN[key] = reference_kernel(data)
    return _SEEN[key]
"""

SEEDS_THE_RNG = """
import torch
from sialoop.tasks.trimul.reference import Case, generate_input, reference_kernel

def custom_kernel(data):
    x, mask, weights, config = data
    torch.manual_seed(0)  # predicting the inputs from an RNG: they come from the parent's OS
    case = Case(x.shape[1], x.shape[0], x.shape[3], config["hidden_dim"], True, "normal")
    return reference_kernel(generate_input(case, 0))
"""

FAKES_THE_CLOCK = """
import sys, time
from sialoop.tasks.trimul.reference import reference_kernel

def custom_kernel(data):
    for module in list(sys.modules.values()):
        if hasattr(module, "_CLOCK") and hasattr(module, "_program"):
            module._CLOCK = lambda: 0.0  # the wrapper's clock now says no time passes
    time.sleep(0.3)
    return reference_kernel(data)
"""


@pytest.mark.parametrize(
    "source, why",
    [(CACHING, "fresh input"), (SEEDS_THE_RNG, "tolerance"), (FAKES_THE_CLOCK, "wall time")],
    ids=["caches-outputs", "seeds-the-rng", "fakes-the-clock"],
)
def test_a_program_cannot_cache_predict_or_fake_its_time(task: TriMulTask, source: str, why):
    with pytest.raises(ProgramFailed, match=why):
        task.score(task.instances("train")[2], {"program": source})


def test_a_bare_gpu_mode_submission_is_its_own_harness(task: TriMulTask, tmp_path: Path):
    submission = "from sialoop.tasks.trimul.reference import reference_kernel\n\n\n" \
        "def custom_kernel(data):\n    return reference_kernel(data)\n"  # fmt: skip
    harness = task.adapt_harness(submission)
    path = tmp_path / "h.py"
    path.write_text(harness)
    from sialoop.harness.program import load_harness

    module = load_harness(path)
    program = module.solve({}, None)["program"]
    assert program == harness and "custom_kernel" in program
    assert task.score(task.instances("train")[0], {"program": program}).detail["margin"] <= 1.0


def test_a_killed_runs_tensors_are_removed_by_the_next_task(tmp_path: Path):
    """/dev/shm is memory: the work dir of a task whose process died (a SIGKILL skips atexit)
    goes when the next task starts; a live owner's and a just-created one stay."""
    import subprocess
    import sys

    from sialoop.harness.runtime import owner_tag, remove_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dirs = {name: tmp_path / f"sialoop-trimul-{name}" for name in ("dead", "alive", "new")}
    for d in dirs.values():
        d.mkdir()
    (dirs["dead"] / "owner").write_text(f"{int(dead.stdout)} 1")
    (dirs["alive"] / "owner").write_text(owner_tag(os.getpid()))
    remove_orphans(tmp_path, "sialoop-trimul-")
    assert not dirs["dead"].exists() and dirs["alive"].exists() and dirs["new"].exists()


def test_reference_and_check_follow_the_spec():
    case = Case(16, 2, 32, 8, False, "cauchy")
    data = generate_input(case, 5)
    assert torch_equal(data[0], generate_input(case, 5)[0])  # a seed reproduces its input
    assert set(data[1].unique().tolist()) <= {0.0, 1.0}
    ref = reference_kernel(data)
    assert tuple(ref.shape) == (2, 16, 16, 32)
    assert check(ref.clone(), ref) == (0.0, None)
    bumped = ref.clone()
    bumped[0, 0, 0, 0] += 0.05 + 0.03 * abs(float(ref[0, 0, 0, 0]))
    margin, why = check(bumped, ref)
    assert margin > 1.0 and "tolerance" in why
    assert case.flops() > 0


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _traj(version: str, item: str, units: dict[str, float]) -> Trajectory:
    score = Score(value=math.exp(sum(units.values()) / len(units)), detail={"units": units})
    return Trajectory(
        run_id="r", version_id=version, split="val", instance_id=item, score=score, seconds=1.0
    )


def test_the_gate_rejects_a_timing_gain_within_the_measured_noise(small_data: Path, tmp_path: Path):
    task = TriMulTask(data=small_data, cache_dir=tmp_path)
    try:
        assert task.noise_margin() == 0.0  # nothing measured yet
        # the reference re-timed across evaluations: log-time spread 0.1 per val shape
        labels = [i.inputs["case"]["label"] for i in task.instances("val")]
        times = {label: [math.exp(x) for x in (0.0, 0.1, -0.1, 0.05, -0.05)] for label in labels}
        task._timing_file.parent.mkdir(parents=True, exist_ok=True)
        task._timing_file.write_text(json.dumps(times))
        margin = task.noise_margin()
        assert 0.05 < margin < 0.2
    finally:
        task.close()
    # a candidate that is consistently 0.04 faster in log time on every run of every shape
    inc, cand = [], []
    for item in ("a", "b", "c", "d"):
        base = {f"rep{k}": 0.5 + 0.01 * k for k in range(3)}
        inc.append(_traj("v0", item, base))
        cand.append(_traj("v1", item, {k: v + 0.04 for k, v in base.items()}))
    speedup = task.metric
    plain = gate(inc, cand, GateSettings(noise="units"), speedup)
    assert plain.accepted, plain.reason  # without the margin the bootstrap takes it
    noisy = gate(inc, cand, GateSettings(noise="units", min_gain=margin), speedup)
    assert not noisy.accepted and noisy.margin == margin, noisy.reason


def test_the_task_states_its_config_defaults():
    cfg = load_config(None, {"task": "trimul"})
    assert cfg.sandbox.workers == 1 and cfg.sandbox.memory_mb == 65536
    assert cfg.split.val_size == 0  # every benchmark shape
    over = load_config(None, {"task": "trimul", "sandbox.workers": 3})
    assert over.sandbox.workers == 3 and over.sandbox.memory_mb == 65536
    assert load_config(None, {"task": "lawbench"}).sandbox.workers == 2  # other tasks: as before


class _Choice:
    def __init__(self, text: str):
        self.text = text


class _LLM:
    """An OpenAI-client stand-in answering one fixed completion."""

    def __init__(self, text: str):
        self.completions = self
        self.text = text
        self.prompts: list[str] = []

    def create(self, **kwargs):
        self.prompts.append(kwargs["prompt"])
        return type("R", (), {"choices": [_Choice(self.text)]})()


def test_the_generator_harness_turns_proposals_into_programs(
    task: TriMulTask, tmp_path: Path, monkeypatch
):
    public = tmp_path / "public"
    task.write_public(public)
    monkeypatch.chdir(tmp_path)
    from sialoop.harness.program import load_harness
    from sialoop.tasks.templates import template_source

    path = tmp_path / "generator.py"
    path.write_text(template_source("sialoop.tasks.trimul", "generator.py"))
    module = load_harness(path)
    inst = task.instances("train")[0]
    llm = _LLM(
        ' LAYOUT="channel_first" PROJ=fused THREADS=banana INPLACE=True BLOCK=1000 BLOCK=1024'
        " ALLOC=retain PROJ_DTYPE=bf16x3\n"
    )
    out = module.solve(inst.inputs, llm)
    assert out["settings"] == {
        "LAYOUT": "channel_first", "PROJ": "fused", "INPLACE": True, "BLOCK": 1024,
        "ALLOC": "retain", "PROJ_DTYPE": "bf16x3",
    }  # fmt: skip
    assert "N=32" in llm.prompts[0] and "LAYOUT in channel_last|channel_first" in llm.prompts[0]
    assert (
        'LAYOUT = "channel_first"' in out["program"] or "LAYOUT = 'channel_first'" in out["program"]
    )
    # the blocked pipeline, with ALLOC changing glibc's allocator through ctypes, inside the worker
    score = task.score(inst, out)
    assert score.detail["margin"] <= 1.0
    assert module.solve(inst.inputs, None)["settings"] == {}  # no policy: the template as is


@pytest.mark.slow  # the fast suite's program-task loops: sortcost (test_any_task), denoise
def test_a_loop_generation_runs_and_archives(
    small_data: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("SIALOOP_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, [
        "run", "--task", "trimul", "--data", str(small_data), "--runs-dir", str(tmp_path),
        "--run-id", "t", "--set", f"policy.model='{tiny_model_dir}'",
        "--set", "policy.dtype='float32'", "--set", "loop.generations=1",
        "--set", "loop.levers=['harness']", "--set", "train.max_steps=2",
        "--set", "loop.train_batch=4",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "t")
    versions = {v.version_id: v for v in store.versions()}
    assert {"v0", "v1"} <= set(versions)
    for v in versions.values():
        assert (store.root / v.harness_path).is_file()
        if v.version_id != "v0":
            assert v.parent_id is not None and v.detail.get("diff"), v
    decisions = {d.generation: d for d in store.decisions()}
    assert 1 in decisions and all(d.rationale for d in decisions.values())
    (v0_val,) = [e for e in store.evaluations("val") if e.version_id == "v0"]
    assert v0_val.value is not None and v0_val.direction == "higher" and v0_val.value > 0
    gated = [v.detail["gate"] for v in versions.values() if v.detail.get("gate")]
    assert gated and all(g["margin"] > 0 for g in gated)  # the measured timing noise
    (test_ev,) = store.evaluations("test")
    assert test_ev.n == 10
    for traj in store.trajectories("v0", "val"):
        assert traj.score is not None and traj.score.detail["margin"] <= 1.0
    assert os.path.isdir(tmp_path / "home" / "cache" / "trimul")
