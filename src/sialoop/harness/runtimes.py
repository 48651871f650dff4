"""Harness runtimes by name: the strategy object that runs a harness's `solve` in isolation.

A runtime is a context-manager class taking `(harness_path, *, policy_url, adapter, limits,
public_dir, scratch_root, deny_read)` whose `solve(inputs, episode_id)` returns a
`SandboxResult` (see `harness/sandbox.py`, whose docstring lists what it does and does not
contain), and whose `close()` may be called from another thread to end an in-flight `solve`
within a second or so (a rollout does that on Ctrl-C). It runs the harness's `setup` before any
instance, in its own budget, and marks machine-caused failures `RolloutError.infra` (the
contract is in `harness/program.py`). Config picks one by name (`sandbox.runtime`); a plug-in may add its own here.

`isolation` (`sandbox.isolation`: "auto", "namespaces" or "guard"; see `harness/isolation.py`)
is bound into the runtime returned (default "guard" until the config key is wired); "namespaces"
is checked here, so
a machine without bubblewrap fails at once with a one-line error naming how to install it.
"""

from __future__ import annotations

import functools
from typing import Any

from sialoop.errors import ConfigError
from sialoop.harness.isolation import resolve_isolation


def _subprocess(isolation: str) -> Any:
    from sialoop.harness.sandbox import Sandbox

    return functools.partial(Sandbox, isolation=resolve_isolation(isolation))


RUNTIMES = {"subprocess": _subprocess}


def harness_runtime(name: str, isolation: str = "guard") -> Any:
    """The runtime called `name` under `isolation`; a one-line error naming the known ones
    otherwise (or saying why "namespaces" is unavailable)."""
    if name not in RUNTIMES:
        raise ConfigError(f"sandbox.runtime '{name}' is unknown: use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name](isolation)
