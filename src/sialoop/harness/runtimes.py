"""Harness runtimes by name: the strategy object that runs a harness's `solve` in isolation.

A runtime is a context-manager class taking `(harness_path, *, policy_url, adapter, limits,
public_dir, scratch_root, deny_read)` whose `solve(inputs, episode_id)` returns a
`SandboxResult` (see `harness/sandbox.py`, whose docstring lists what it does and does not
contain), and whose `close()` may be called from another thread to end an in-flight `solve`
within a second or so (a rollout does that on Ctrl-C). It runs the harness's `setup` before any
instance, in its own budget, and marks machine-caused failures `RolloutError.infra` (the
contract is in `harness/program.py`). Config picks one by name (`sandbox.runtime`); a plug-in may add its own here.
"""

from __future__ import annotations

from typing import Any

from sialoop.errors import ConfigError


def _subprocess() -> Any:
    from sialoop.harness.sandbox import Sandbox

    return Sandbox


RUNTIMES = {"subprocess": _subprocess}


def harness_runtime(name: str) -> Any:
    """The runtime class called `name`; a one-line error naming the known ones otherwise."""
    if name not in RUNTIMES:
        raise ConfigError(f"sandbox.runtime '{name}' is unknown: use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]()
