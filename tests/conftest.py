"""Shared fixtures: the tiny random Gemma 3 (real 262k-vocab tokenizer) that fast tests run on."""

from pathlib import Path

import pytest

from sialoop.policy import model_files


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Gemma 3 (sliding window 16) built once per test session."""
    return model_files.tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-gemma3")


@pytest.fixture(scope="session")
def _chromium():
    """One headless Debian Chromium for the session's browser tests (tests/browser.py)."""
    from browser import browser_missing, chromium

    why = browser_missing()
    if why:
        pytest.fail(f"{why}: the dashboard's browser tests need them")
    with chromium() as driver:
        yield driver


@pytest.fixture
def browser(_chromium):
    """The session's Chromium on a blank page with an empty console, and left on one (so no
    page keeps polling a server that a test has stopped)."""
    _chromium.get("about:blank")
    _chromium.get_log("browser")
    yield _chromium
    _chromium.get("about:blank")
