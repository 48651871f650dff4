"""The command line: every user-fixable input is one line and exit 2 before any work is done;
--version, -h, `runs`, `resume`/`eval` with --set, and `doctor` for one run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.config import RunConfig
from sialoop.errors import ConfigError
from sialoop.preflight import check_harness, check_run_id, resume_config

runner = CliRunner()


def _one_line_error(args: list[str], needle: str) -> str:
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and needle in lines[0], lines[0]
    return lines[0]


def _quick(model: Path, runs: Path) -> list[str]:
    """Flags of a toy run on the tiny model that takes seconds."""
    return [
        "--task", "toy", "--runs-dir", str(runs),
        "--set", f"policy.model='{model}'", "--set", "policy.dtype='float32'",
        "--set", "sandbox.timeout_s=20", "--set", "loop.generations=0",
        "--val-size", "4", "--set", "split.test_size=4",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["run", *_quick(tiny_model_dir, runs), "--run-id", "r1"])
    assert result.exit_code == 0, result.output
    return runs / "r1"


def _bad_inputs(tmp: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "cfgdir").mkdir()
    (tmp / "latin.toml").write_bytes(b'task = "toy"\n# caf\xe9\n')
    (tmp / "bad.toml").write_text("task = [\n")
    (tmp / "runsfile").write_text("x")
    (tmp / "hdir").mkdir()
    (tmp / "nosolve.py").write_text("def answer(instance, llm):\n    return 1\n")
    (tmp / "empty-model").mkdir()
    (tmp / "empty-model" / "config.json").write_text("")
    runs = tmp / "runs"
    quick = _quick(model, runs)
    return {
        "config dir": (["--config", str(tmp / "cfgdir")], "is a folder: pass a TOML file"),
        "non-UTF-8": (["--config", str(tmp / "latin.toml")], "is not UTF-8 text"),
        "invalid TOML": (["--config", str(tmp / "bad.toml")], "is not valid TOML"),
        "runs-dir file": ([*quick, "--runs-dir", str(tmp / "runsfile")], "is a file"),
        "harness dir": (
            [*quick, "--set", f"harness='{tmp / 'hdir'}'"],
            f"{tmp / 'hdir'} is a folder",
        ),
        "no solve": (
            [*quick, "--set", f"harness='{tmp / 'nosolve.py'}'"],
            f"harness {tmp / 'nosolve.py'} defines no `solve(instance, llm)`",
        ),
        "empty config.json": (
            [*quick, "--set", f"policy.model='{tmp / 'empty-model'}'"],
            "config.json is empty",
        ),
        "target modules": (
            [*quick, "--set", 'train.target_modules=["nope"]'],
            "'nope' names no module of the model",
        ),
        "run-id escape": ([*quick, "--run-id", "../escaped"], "--run-id '../escaped'"),
        "unknown key": (
            [*quick, "--set", "loop.generation=2"],
            "unknown config key 'loop.generation': did you mean 'loop.generations'?",
        ),
    }


def test_each_bad_input_is_one_line_exit_2_and_no_run_directory(
    tmp_path: Path, tiny_model_dir: Path
):
    for name, (args, needle) in _bad_inputs(tmp_path, tiny_model_dir).items():
        _one_line_error(["run", *args], needle)
        made = list((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else []
        assert not made, f"{name}: {made}"
    assert not (tmp_path / "escaped").exists()
    assert not list((tmp_path / "runsfile").parent.glob("runsfile/*"))


def test_a_real_terminal_gets_one_line_and_no_traceback(tmp_path: Path):
    harness = tmp_path / "h.py"
    harness.write_text("def solve(instance):\n    return 1\n")
    exe = Path(sys.executable).with_name("sialoop")
    proc = subprocess.run(
        [str(exe), "run", "--task", "toy", "--runs-dir", str(tmp_path / "runs"),
         "--set", f"harness='{harness}'"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "60"},
    )  # fmt: skip
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(out) == 1, proc.stdout + proc.stderr
    assert str(harness) in out[0] and "exactly 2 positional parameters" in out[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad", ["../escaped", "a/b", ".hidden", "..", "", "x y", "a\\b"])
def test_the_run_id_escape_is_refused(tmp_path: Path, bad: str):
    with pytest.raises(ConfigError, match="--run-id"):
        check_run_id(bad, tmp_path)
    check_run_id("2026-01-01_toy.v2", tmp_path)


def test_harness_is_parsed_not_imported(tmp_path: Path):
    path = tmp_path / "h.py"
    path.write_text(
        "raise SystemExit('imported')\ndef solve(instance, llm, *, k=1):\n    return k\n"
    )
    check_harness(path)  # would exit the test process if imported
    for source, needle in [
        ("async def solve(instance, llm):\n    return 1\n", "async"),
        ("def solve(instance, llm, *, k):\n    return 1\n", "without defaults"),
        ("def solve(instance, llm\n", "does not parse: line 1"),
    ]:
        path.write_text(source)
        with pytest.raises(ConfigError, match=needle):
            check_harness(path)
    path.write_text("try:\n    from fast import solve\nexcept ImportError:\n    solve = None\n")
    check_harness(path)  # bound at module level: only running it can tell more


def test_version_and_short_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip().startswith("sialoop 0.")
    for command in ("run", "resume", "eval", "report", "runs", "doctor", "tasks"):
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0 and "Usage:" in result.output, command
    assert "repeatable" in runner.invoke(app, ["resume", "-h"]).output
    top = runner.invoke(app, ["-h"]).output
    assert all(c in top for c in ("run", "resume", "eval", "report", "runs", "doctor", "--verbose"))


def test_verbose_is_kept_for_other_modules_and_children(monkeypatch: pytest.MonkeyPatch):
    from sialoop.verbosity import ENV, is_verbose

    monkeypatch.delenv(ENV, raising=False)
    assert runner.invoke(app, ["tasks"]).exit_code == 0 and not is_verbose()
    assert runner.invoke(app, ["--verbose", "tasks"]).exit_code == 0
    assert is_verbose() and os.environ[ENV] == "1"


def test_runs_lists_a_finished_run(finished_run: Path):
    (finished_run.parent / "not-a-run").mkdir()
    result = runner.invoke(app, ["runs", str(finished_run.parent)])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[1:] if line.strip()]
    assert len(rows) == 1, result.output
    run_id, task, status, val, test, minutes = rows[0]
    assert (run_id, task, status) == ("r1", "toy", "finished")
    assert float(val) >= 0 and float(test) >= 0 and float(minutes) >= 0


def test_resume_and_eval_refuse_before_loading(finished_run: Path):
    root = str(finished_run)
    _one_line_error(["resume", root, "--set", "gate.alpha=0.5"], "fixed for the run's life")
    _one_line_error(["eval", root, "--set", "train.rank=4"], "--set train.rank: fixed")
    _one_line_error(["resume", root, "--set", "loop.generation=2"], "did you mean")
    _one_line_error(["eval", root, "--split", "train"], "--split train: use val or test")
    _one_line_error(["eval", root, "--split", "test"], "pass --force")
    done = runner.invoke(app, ["resume", root])
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert done.exit_code == 0 and len(lines) == 1 and "is finished" in lines[0], done.output


def test_resume_config_changes_only_what_may_change(tmp_path: Path, tiny_model_dir: Path):
    stored = RunConfig(task="toy", policy={"model": str(tiny_model_dir)})
    cfg = resume_config(stored, ["loop.generations=3", "sandbox.workers=1", "loop.minutes=2.5"])
    assert (cfg.loop.generations, cfg.sandbox.workers, cfg.loop.minutes) == (3, 1, 2.5)
    assert cfg.model_copy(update={"loop": stored.loop, "sandbox": stored.sandbox}) == stored
    assert resume_config(stored, []) is stored
    gone = stored.model_copy(update={"harness": tmp_path / "deleted.py"})  # copied into the run
    assert resume_config(gone, ["loop.minutes=1"]).harness == tmp_path / "deleted.py"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json is not JSON"):
        resume_config(stored, [f"policy.model='{tmp_path / 'm'}'"])
    with pytest.raises(ConfigError, match=r"loop\.generations"):
        resume_config(stored, ["loop.generations=-1"])


def test_doctor_checks_one_run(tmp_path: Path, tiny_model_dir: Path):
    args = ["doctor", "--task", "toy", "--set", f"policy.model='{tiny_model_dir}'"]
    result = runner.invoke(app, [*args, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    for name in ("data", "harness", "plugins", "model", "tokenizer", "lora targets", "sandbox"):
        assert f"ok   {name}" in result.output, name
    assert "transformers" in result.output and "peft" in result.output
    bad = runner.invoke(app, [*args, "--runs-dir", str(tmp_path / "runs"), "--set", "x.y=1"])
    assert bad.exit_code == 1 and "FIX  config" in bad.output
