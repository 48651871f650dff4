"""Headless Debian Chromium driven by Selenium, pinned to the system browser and driver, and a
dashboard server on a free loopback port. Nothing here downloads a browser or a driver: the
driver's path is given, so Selenium Manager is never asked, and SE_OFFLINE keeps it offline."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return "Debian chromium and chromium-driver are not installed (`make test` installs them)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(where: Path) -> Iterator[str]:
    """The dashboard for `where` on a loopback port, in a thread; yields its base URL."""
    import uvicorn

    from sialoop.web.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(where), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # set by uvicorn once the socket listens
        if not thread.is_alive():
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = (
        Path(os.environ.get("TMPDIR", "/tmp")) / f"sialoop-chromium-{os.getpid()}-{time.time_ns()}"
    )
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, predicate: Any, timeout: float = 60.0) -> Any:
    """Polls `predicate(driver)` until it is truthy: an event, not a fixed sleep."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(predicate)


def rendered(driver: Any, page: str, timeout: float = 60.0) -> None:
    """Waits until the app says it rendered `page` (body[data-rendered])."""
    wait_for(
        driver, lambda d: d.execute_script("return document.body.dataset.rendered") == page, timeout
    )


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
