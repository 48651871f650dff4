"""A harness program: one Python file defining `solve(instance, llm) -> output`.

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


def load_harness(path: str | Path) -> ModuleType:
    """Import the harness file at `path` as a fresh module and check its `solve`.

    This runs the file's module-level code in the current process, unsandboxed: call it inside
    the sandbox worker, or on files you trust. Exceptions raised by that code propagate as they
    are (so the worker can tell a MemoryError from a crash); a missing file, a syntax error or
    a bad `solve` raise HarnessInvalid. The module is registered in `sys.modules` under a
    unique name (dataclasses and pickle need that) and stays there.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessInvalid(f"harness file not found: {path}")
    name = f"sialoop_harness_{uuid.uuid4().hex[:12]}"
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
    return module


def _syntax_message(path: Path, err: SyntaxError) -> str:
    return f"{path.name} does not parse: line {err.lineno}: {err.msg}"


def validate_harness(
    path: str | Path, *, public_dir: str | Path | None = None, limits: SandboxLimits | None = None
) -> None:
    """Raise HarnessInvalid (a one-line message) unless the file parses, imports inside a
    sandboxed worker, and defines a usable `solve`.

    The import runs with `public_dir` linked in as `public/` (harnesses often read their train
    examples at import time) and with no policy endpoint: module-level code that calls the LLM
    fails here. `limits` is a `SandboxLimits` (default: its defaults). A passing harness can
    still fail on instances; the loop's smoke run is what checks `solve` itself.
    """
    # sandbox imports the worker, which imports this module: import it only when needed.
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
        )
        with sandbox:
            error = sandbox.start()
    if error is not None:
        first = error.message.splitlines()[0] if error.message else error.kind.value
        raise HarnessInvalid(f"{path.name}: {first}")
