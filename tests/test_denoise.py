"""The denoising task on small generated count matrices: its splits and what stays private, the
trusted runtime's verdicts (a valid pipeline scored with its figures and shortcut checks, an
invalid one with its reason, a program that reads the data refused), the generator harness,
and one real 2-generation loop from the invalid MAGIC start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.harness.operators import apply_assignments
from sialoop.store import Store
from sialoop.tasks.denoise import DenoiseTask, ProgramFailed
from sialoop.tasks.denoise.metrics import Controls, evaluate, mcv_split

runner = CliRunner()
VALID = {"POST": "explog", "T": 1, "SINK": 1, "MASS": "libsize"}


def _counts(cells: int, genes: int, seed: int) -> sp.csr_matrix:
    """Negative-binomial counts from four cell types with their own gene programs."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(-1.0, 1.5, size=genes)
    programs = rng.lognormal(0.0, 1.0, size=(4, genes))
    kind = rng.integers(0, 4, size=cells)
    depth = rng.lognormal(0.0, 0.4, size=(cells, 1))
    mean = base * programs[kind] * depth * 2.0
    counts = rng.negative_binomial(5, 5 / (5 + mean))
    return sp.csr_matrix(counts.astype(np.int32))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "scrna").mkdir()
    sp.save_npz(root / "scrna" / "alpha_counts.npz", _counts(150, 300, 0))
    sp.save_npz(root / "scrna" / "beta_counts.npz", _counts(90, 200, 1))
    return root


@pytest.fixture(scope="module")
def task(data: Path):
    t = DenoiseTask(data=data)
    yield t
    t.close()


def _program(task: DenoiseTask, **knobs) -> str:
    source = task.reference_harness()
    if knobs:
        source = apply_assignments(source, knobs)
    return task.adapt_harness(source)


def test_splits_roles_and_what_stays_private(task: DenoiseTask, data: Path):
    assert {s: len(task.instances(s)) for s in ("train", "val", "test")} == {
        "train": 1, "val": 1, "test": 2,
    }  # fmt: skip
    assert task.headline == "alpha"  # no Tabula Muris here: the first dataset by name
    roles = [(i.inputs["dataset"], i.inputs["role"]) for i in task.instances("test")]
    assert roles == [("alpha", "headline"), ("beta", "transfer")]
    val, test = task.instances("val")[0], task.instances("test")[0]
    # val is a second split of test's input half: fewer counts, never the held-out ones
    assert val.inputs["counts"] < test.inputs["counts"]
    outer = mcv_split(sp.load_npz(data / "scrna" / "alpha_counts.npz"), 0)
    assert test.inputs["counts"] == int(outer.train.sum())
    assert task.label(val) is None
    with pytest.raises(PermissionError):
        task.label(test)
    assert (data / "scrna").resolve() in [p.resolve() for p in task.private_paths()]
    shapes = task.summary()["datasets"]  # genes without train counts are dropped
    assert shapes["alpha"][0] == 150 and shapes["beta"][0] == 90 and shapes["beta"][1] <= 200


def test_magic_is_invalid_and_a_metric_aware_pipeline_is_scored(task: DenoiseTask):
    val = task.instances("val")[0]
    gen0 = _program(task)
    assert "def solve" not in task.reference_harness() and "def solve" in gen0
    with pytest.raises(ProgramFailed, match=r"alpha: invalid output: poisson_norm .* < 0.97"):
        task.score(val, {"program": gen0})
    score = task.score(val, {"program": _program(task, **VALID)})
    d = score.detail
    assert score.value == d["mse_norm"] > 0 and d["valid"] and d["poisson_norm"] >= 0.97
    assert d["role"] == "headline" and d["dataset"] == "alpha" and d["seconds"] > 0
    assert score.seconds == d["wall_s"] >= d["seconds"]  # running the program is its cost
    assert len(d["units"]) == val.inputs["cells"]
    assert abs(np.mean(list(d["units"].values())) - score.value) < 1e-9  # unclipped here
    assert d["shortcuts"]["zeros_valid"] is False
    assert d["shortcuts"]["scaled_1e-3_valid"] and d["shortcuts"]["scaled_equals_unscaled"]
    assert {"poisson_raw", "poisson_norm_raw", "upstream_valid", "mass_ratio"} <= set(d)
    # val is the metrics module's second split of the input half, seeded
    counts = sp.load_npz(task.folder / "alpha_counts.npz")
    inner = mcv_split(mcv_split(counts, 0).train, 1)
    assert [val.inputs["cells"], val.inputs["genes"]] == list(inner.train.shape)
    assert evaluate(inner.test.toarray() * 1.0, Controls.of(inner))["mse_norm"] == 1.0
    assert task.score(val, {"program": _program(task, **VALID)}) is score  # cached by hash
    # transfer instances are reported, never in the split's value
    test = task.instances("test")
    scores = [task.score(i, {"program": _program(task, **VALID)}) for i in test]
    assert scores[1].detail["role"] == "transfer"
    assert [task.counts_toward_score(i) for i in test] == [True, False]


def test_a_program_that_reads_the_data_or_returns_nonsense_is_refused(task: DenoiseTask):
    val = task.instances("val")[0]
    folder = task.folder.resolve()
    thief = (
        "import numpy as np, scipy.sparse as sp\n"
        "def denoise(counts):\n"
        f"    full = sp.load_npz({str(folder / 'alpha_counts.npz')!r})\n"
        "    return np.asarray(full.todense(), dtype=float)\n"
    )
    with pytest.raises(ProgramFailed) as caught:
        task.score(val, {"program": task.adapt_harness(thief)})
    assert "alpha_counts.npz" in str(caught.value) or "ermission" in str(caught.value)
    for body, why in (
        ("return counts[:, :3]", "shape"),
        ("return -counts", "negative"),
        ("return counts * np.nan", "NaN"),
        ("return counts * 0.0", "all zeros"),
    ):
        source = f"import numpy as np\ndef denoise(counts):\n    {body}\n"
        with pytest.raises(ProgramFailed, match=why):
            task.score(val, {"program": task.adapt_harness(source)})


def test_the_generator_harness_proposes_settings(task: DenoiseTask, tmp_path: Path, monkeypatch):
    public = tmp_path / "public"
    task.write_public(public)
    assert json.loads((public / "program_knobs.json").read_text())["POST"] == ["counts", "explog"]
    monkeypatch.chdir(tmp_path)
    from sialoop.harness.program import load_harness
    from sialoop.tasks.templates import template_source

    class _LLM:
        def __init__(self, text: str):
            self.text, self.prompts = text, []
            self.completions = self

        def create(self, **kw):
            self.prompts.append(kw["prompt"])
            choice = type("C", (), {"text": self.text})()
            return type("R", (), {"choices": [choice]})()

    path = tmp_path / "generator.py"
    path.write_text(template_source("sialoop.tasks.denoise", "generator.py"))
    module = load_harness(path)
    llm = _LLM(" POST=explog T=1 SINK=1 MASS=libsize POWER=banana KNN=7\n")
    out = module.solve(task.instances("train")[0].inputs, llm)
    assert out["settings"] == {"POST": "explog", "T": 1, "SINK": 1, "MASS": "libsize"}
    assert "alpha" in llm.prompts[0] and "POST in counts|explog" in llm.prompts[0]
    score = task.score(task.instances("train")[0], out)
    assert score.detail["valid"]


def test_a_two_generation_loop_runs_from_the_invalid_start(
    data: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("SIALOOP_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, [
        "run", "--task", "denoise", "--data", str(data), "--runs-dir", str(tmp_path),
        "--run-id", "d", "--set", f"policy.model='{tiny_model_dir}'",
        "--set", "policy.dtype='float32'", "--set", "loop.generations=2",
        "--set", "loop.levers=['harness']", "--set", "train.max_steps=2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "d")
    versions = {v.version_id: v for v in store.versions()}
    assert {"v0", "v1", "v2"} <= set(versions)
    (v0_val,) = [e for e in store.evaluations("val") if e.version_id == "v0"]
    assert v0_val.value is None and v0_val.direction == "higher"  # MAGIC: invalid at full mass
    (v0_traj,) = store.trajectories("v0", "val")
    assert v0_traj.error is not None and "poisson_norm" in v0_traj.error.message
    decisions = {d.generation: d for d in store.decisions()}
    assert {1, 2} <= set(decisions) and all(d.rationale for d in decisions.values())
    (test_ev,) = store.evaluations("test")
    assert test_ev.n == 2
    # the split's value is the headline's score alone: a transfer dataset never counts, even
    # where the program's output on it is invalid
    by_role = {t.instance_id: t for t in store.trajectories(test_ev.version_id, "test")}
    head = by_role["test-0"]
    assert (head.score.value if head.score else None) == test_ev.value
    # an item's cost counts the program's run, which the harness (it only writes the
    # program) does not see
    scored = [e for e in store.evaluations("val") if e.value is not None]
    for e in scored:
        (t,) = store.trajectories(e.version_id, "val")
        assert t.score.seconds > 0
        assert e.seconds_per_item == pytest.approx(t.seconds + t.score.seconds)
