"""Whether the user asked for `--verbose` output (third-party progress bars and warnings).

Kept in the environment variable `SIALOOP_VERBOSE` so that child processes (sandbox workers,
trainers) see the same choice; `sialoop --verbose` sets it, and setting it by hand works too.
"""

from __future__ import annotations

import os

ENV = "SIALOOP_VERBOSE"


def set_verbose(on: bool) -> None:
    """Record `--verbose` for this process and its children (off leaves a user's value alone)."""
    if on:
        os.environ[ENV] = "1"


def is_verbose() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")
