"""A harness program: one Python file defining `solve(instance, llm) -> output`.

The contract:
- `solve(instance, llm)`: one instance (a JSON object) and an OpenAI client bound to the policy
  endpoint (None when there is none); returns a JSON-serialisable output. Timed per instance.
- `setup()` or `setup(cached)`, optional: the harness's one-time work (an import, a fitted
  classifier, a compiled kernel). The sandbox worker calls it once after importing the file and
  before any instance, under its own budget (`SandboxLimits.setup_timeout_s`), so no instance
  pays for it. It takes no LLM. When it raises or runs out of time, every instance of that
  sandbox fails at once with `ErrorKind.setup` and its message; it is not re-run per instance.
  A worker is replaced after a timeout or a crash, and the new one runs setup again (again in
  its own budget). To restart warm, take one parameter and return a picklable state:
  `setup(cached)` gets None in a sandbox's first worker and, in a replacement, the unpickled
  state the last fresh setup returned (kept under the sandbox's scratch directory, within
  `file_size_mb`; types defined in the harness itself pickle too). A state that cannot be
  pickled or read back is not an error: setup then simply gets None again.

`load_harness` imports such a file in the current process (the sandbox worker uses it);
`validate_harness` checks one from outside, importing it only inside a sandboxed worker.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import tempfile
import uuid
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from sialoop.errors import SialoopError

if TYPE_CHECKING:
    from sialoop.harness.sandbox import SandboxLimits

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class HarnessInvalid(SialoopError):
    """The harness file does not parse, fails to import, or has no usable `solve`."""


def check_solve(module: ModuleType) -> None:
    """Raise HarnessInvalid unless `module.solve` is a plain callable taking exactly two
    positional parameters (keyword-only ones need defaults; `**kwargs` is allowed)."""
    solve = getattr(module, "solve", None)
    if solve is None:
        raise HarnessInvalid("the harness defines no `solve(instance, llm)`")
    if not callable(solve):
        raise HarnessInvalid(f"`solve` is a {type(solve).__name__}, not a function")
    if inspect.iscoroutinefunction(solve) or inspect.isasyncgenfunction(solve):
        raise HarnessInvalid("`solve` must be a plain function, not async")
    try:
        params = list(inspect.signature(solve).parameters.values())
    except (TypeError, ValueError) as err:
        raise HarnessInvalid(f"cannot read the signature of `solve`: {err}") from err
    positional = [p for p in params if p.kind in _POSITIONAL]
    star = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    if len(positional) != 2 or star:
        shown = ", ".join(str(p) for p in params)
        raise HarnessInvalid(
            f"`solve` must take exactly 2 positional parameters (instance, llm); it takes ({shown})"
        )
    required = [
        p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty
    ]
    if required:
        raise HarnessInvalid(f"`solve` has keyword-only parameters without defaults: {required}")


def _positional(fn: object, name: str) -> list[inspect.Parameter]:
    if not callable(fn):
        raise HarnessInvalid(f"`{name}` is a {type(fn).__name__}, not a function")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise HarnessInvalid(f"`{name}` must be a plain function, not async")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as err:
        raise HarnessInvalid(f"cannot read the signature of `{name}`: {err}") from err
    required = [
        p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty
    ]
    if required:
        raise HarnessInvalid(f"`{name}` has keyword-only parameters without defaults: {required}")
    return [p for p in params if p.kind in _POSITIONAL]


def check_setup(module: ModuleType) -> None:
    """Raise HarnessInvalid unless `module.setup` is absent, or a plain callable taking no
    parameter or one (`cached`; see the module docstring)."""
    setup = getattr(module, "setup", None)
    if setup is None:
        return
    positional = _positional(setup, "setup")
    if len(positional) > 1:
        raise HarnessInvalid(
            f"`setup` must take no parameter or one (cached); it takes {len(positional)}"
        )


def setup_takes_cached(setup: object) -> bool:
    """Whether a checked `setup` takes the `cached` state."""
    return len(_positional(setup, "setup")) == 1


def load_harness(path: str | Path, name: str | None = None) -> ModuleType:
    """Import the harness file at `path` as a fresh module and check its `solve`.

    This runs the file's module-level code in the current process, unsandboxed: call it inside
    the sandbox worker, or on files you trust. Exceptions raised by that code propagate as they
    are (so the worker can tell a MemoryError from a crash); a missing file, a syntax error or
    a bad `solve` raise HarnessInvalid. The module is registered in `sys.modules` under a
    unique name (dataclasses and pickle need that) and stays there; the worker passes a fixed
    `name` so that a pickled setup state that refers to the harness's own types loads back.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessInvalid(f"harness file not found: {path}")
    name = name or f"sialoop_harness_{uuid.uuid4().hex[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HarnessInvalid(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        del sys.modules[name]
        if err.filename != str(path):  # raised by the module's code (compile, eval): a crash
            raise
        raise HarnessInvalid(_syntax_message(path, err)) from err
    except BaseException:
        del sys.modules[name]
        raise
    check_solve(module)
    check_setup(module)
    return module


def _syntax_message(path: Path, err: SyntaxError) -> str:
    return f"{path.name} does not parse: line {err.lineno}: {err.msg}"


def validate_harness(
    path: str | Path,
    *,
    public_dir: str | Path | None = None,
    limits: SandboxLimits | None = None,
    isolation: str = "guard",
) -> None:
    """Raise HarnessInvalid (a one-line message) unless the file parses, imports inside a
    sandboxed worker, and defines a usable `solve`.

    The import runs with `public_dir` linked in as `public/` (harnesses often read their train
    examples at import time) and with no policy endpoint: module-level code that calls the LLM
    fails here. `setup` is checked for its signature but not run. `limits` is a `SandboxLimits`
    (default: its defaults). A passing harness can still fail on instances (or in setup); the
    loop's smoke run is what checks `solve` itself. `isolation` is `sandbox.isolation`: the
    import runs under the same isolation as the rollouts, since module-level code is code too.
    """
    # sandbox imports the worker, which imports this module: import it only when needed.
    from sialoop.harness.isolation import resolve_isolation
    from sialoop.harness.sandbox import Sandbox, SandboxLimits

    path = Path(path)
    if not path.is_file():
        raise HarnessInvalid(f"harness file not found: {path}")
    try:
        ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as err:
        raise HarnessInvalid(_syntax_message(path, err)) from err
    with tempfile.TemporaryDirectory(prefix="sialoop-validate-") as scratch:
        sandbox = Sandbox(
            path,
            policy_url=None,
            adapter="base",
            limits=limits or SandboxLimits(),
            public_dir=Path(public_dir) if public_dir is not None else None,
            scratch_root=Path(scratch),
            run_setup=False,  # the smoke run pays for setup; checking the import is enough here
            isolation=resolve_isolation(isolation),
        )
        with sandbox:
            error = sandbox.start()
    if error is not None:
        first = error.message.splitlines()[0] if error.message else error.kind.value
        raise HarnessInvalid(f"{path.name}: {first}")
