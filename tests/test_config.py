"""Config errors are one line that names the key and the fix."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sialoop.cli import app
from sialoop.config import load_config, parse_override
from sialoop.errors import ConfigError, DataError
from sialoop.tasks import load_task


def test_defaults_and_overrides(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text('task = "toy"\n[split]\nval_size = 10\n')
    cfg = load_config(
        toml, dict([parse_override("policy.dtype=float32"), parse_override("seed=3")])
    )
    assert (cfg.task, cfg.split.val_size, cfg.policy.dtype, cfg.seed) == ("toy", 10, "float32", 3)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[policy]\ndtyp = 'bfloat16'\n", "unknown config key 'policy.dtyp'"),
        ("[split]\nval_size = 'many'\n", "config key 'split.val_size'"),
        ("[policy]\ndtype = 'fp8'\n", "config key 'policy.dtype'"),
        ("harness = '/no/such/file.py'\n", "config key 'harness'"),
        ("[policy]\nmodel = '/no/such/model'\n", "config key 'policy.model'"),
        ("task = [", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, toml: str, needle: str):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config"):
        load_config(Path("/no/such.toml"))


def test_missing_data_names_the_flag(tmp_path: Path):
    with pytest.raises(DataError, match="--data"):
        load_task("lawbench", tmp_path)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "run",
            "--task",
            "lawbench",
            "--data",
            str(tmp_path),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and "--data" in lines[0], result.output
    result = runner.invoke(app, ["run", "--set", "policy.nope=1"])
    assert result.exit_code == 2 and "unknown config key 'policy.nope'" in result.output
    result = runner.invoke(app, ["run", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "no task: pass --task" in result.output
    result = runner.invoke(app, ["run", "--task", "nope", "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output
    result = runner.invoke(app, ["run", "--task", "x.py:Y", "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "x.py does not exist" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no run at" in result.output


def test_doctor_names_the_fix(tmp_path: Path):
    result = CliRunner().invoke(
        app, ["doctor", "--data", str(tmp_path), "--runs-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "FIX" in result.output and "--data" in result.output
    assert "torch" in result.output and "port" in result.output


def test_default_toml_lists_every_key_with_its_default():
    import tomllib

    from sialoop.config import RunConfig, _known_keys

    path = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
    text = path.read_text()
    cfg = RunConfig.model_validate(tomllib.loads(text))
    assert cfg.model_dump(exclude={"task"}) == RunConfig().model_dump(exclude={"task"})
    for key in _known_keys(RunConfig):
        assert key.split(".")[-1] in text, key
