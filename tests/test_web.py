"""The dashboard's own guarantees that need no run: it imports no loop code, and it binds the
loopback address unless told otherwise, with a warning."""

import subprocess
import sys

from typer.testing import CliRunner

from sialoop.cli import app

LOOP_MODULES = ("sialoop.loop", "sialoop.levers", "sialoop.rollout", "sialoop.agents",
                "sialoop.train", "sialoop.policy", "sialoop.harness", "sialoop.tasks",
                "sialoop.evaluator", "sialoop.gate")  # fmt: skip


def test_the_dashboard_imports_no_loop_code():
    code = (
        "import sys, sialoop.web.app, sialoop.web.export; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('sialoop.'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "sialoop.web.data" in loaded
    assert not [m for m in loaded if m.startswith(LOOP_MODULES)], loaded


def test_web_refuses_a_missing_folder_and_warns_on_a_public_address(tmp_path, monkeypatch):
    import uvicorn

    result = CliRunner().invoke(app, ["web", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "is not a folder" in result.output
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: served.append(kw))
    result = CliRunner().invoke(app, ["web", str(tmp_path), "--host", "0.0.0.0", "--port", "9"])
    assert result.exit_code == 0 and "warning" in result.output and "0.0.0.0" in result.output
    result = CliRunner().invoke(app, ["web", str(tmp_path)])
    assert "warning" not in result.output
    assert [kw["host"] for kw in served] == ["0.0.0.0", "127.0.0.1"]
