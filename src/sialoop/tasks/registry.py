"""Where tasks come from: a built-in name, an entry point, a file, or a module.

- a built-in task by name (`lawbench`, `toy`, ...), each one package under `sialoop.tasks`;
- any installed package's entry point in the group `sialoop.tasks` (`name = "pkg.mod:MyTask"`);
- `path/to/file.py:Name`: a class in a Python file (imported once, in this process: a task is
  trusted code, like a scorer; harnesses are not);
- `package.module:Name`: a class in an importable module.

A task class is built with the keyword arguments its `__init__` accepts among `data` (the data
root), `seed` and `val_fraction`, so a user task may take none of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from sialoop.errors import ConfigError
from sialoop.tasks.base import Task

ENTRY_POINT_GROUP = "sialoop.tasks"

BUILTIN: dict[str, str] = {
    "lawbench": "sialoop.tasks.lawbench:LawBenchTask",
    "toy": "sialoop.tasks.toy:ToyTask",
    "arith": "sialoop.tasks.arith:ArithTask",
    "sortcost": "sialoop.tasks.sortcost:SortCostTask",
    "trimul": "sialoop.tasks.trimul:TriMulTask",
    "denoise": "sialoop.tasks.denoise:DenoiseTask",
}


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> dict[str, str]:
    """Every task known by name: built-in ones first, then installed entry points."""
    return {**BUILTIN, **{k: v for k, v in _entry_points().items() if k not in BUILTIN}}


def _from_file(path: Path, attr: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist: pass --task path/to/file.py:ClassName")
    name = f"sialoop_user_task_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"task file {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise ConfigError(
                f"task file {path} failed to import: {type(err).__name__}: {err}"
            ) from None
    return getattr(sys.modules[name], attr, None)


def _from_module(module: str, attr: str) -> Any:
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"task module '{module}' cannot be imported: {err}") from None
    return getattr(found, attr, None)


def resolve_task_class(spec: str) -> type[Task]:
    """The Task subclass `spec` names (see the module docstring); a one-line error otherwise."""
    known = task_names()
    target = known.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"unknown task '{spec}': use one of {', '.join(known)}, a file "
            "(path/to/file.py:ClassName) or a module (package.module:ClassName)"
        )
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py") or "/" in where:
        found = _from_file(Path(where), attr)
    else:
        found = _from_module(where, attr)
    if not (inspect.isclass(found) and issubclass(found, Task)):
        raise ConfigError(
            f"task '{spec}': {where} has no Task subclass named {attr!r}; "
            "subclass sialoop.tasks.Task"
        )
    if inspect.isabstract(found):
        missing = ", ".join(sorted(found.__abstractmethods__))
        raise ConfigError(f"task '{spec}': {attr} does not implement {missing}")
    return found


def build_task(cls: type[Task], **available: Any) -> Task:
    """`cls(**kwargs)` with the keywords its `__init__` accepts among `available`."""
    if cls.__init__ is object.__init__:  # no __init__ of its own: it takes nothing
        return cls()
    params = inspect.signature(cls.__init__).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in available.items() if takes_all or k in params}
    return cls(**kwargs)
