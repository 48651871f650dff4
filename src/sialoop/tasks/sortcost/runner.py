"""The trusted wrapper that runs a candidate sort program inside the sandbox worker.

`SortCostTask.score` copies this file next to the candidate's `program.py` in a fresh temp
dir and runs it as the harness of a `Sandbox` (no policy endpoint). Each `solve` call gets
`{"keys": [...]}`, drawn by the parent, and hands the program `n` opaque items (ordering them
with `<`, `>` and the like raises TypeError) and `less(a, b)`, which compares two of them by
their keys and counts one comparison. It answers `{"order": [...], "comparisons": count}`:
the original position of each returned item, and the count.

Importing this module does nothing: the program is loaded on the first `solve`, inside the
worker, so a program that does not compile or hangs at import fails that call.

Guaranteed for a program that plays fair: the count is every call of `less`. Not guaranteed
against a determined program: it runs in the same process as this wrapper, so it can find the
keys (through the call stack or `gc`), sort without `less`, or reset or forge the count. The
parent re-checks the order against its own keys, never the count.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_NO_ORDER = "items have no order of their own: compare them with less(a, b)"
_PROGRAM: list[ModuleType] = []  # the candidate's module, once loaded


class Item:
    """An opaque item: only `less` knows its key."""

    __slots__ = ()

    def _refuse(self, other: object) -> bool:
        raise TypeError(_NO_ORDER)

    __lt__ = __le__ = __gt__ = __ge__ = _refuse

    def __repr__(self) -> str:
        return "<item>"


def _program() -> ModuleType:
    if not _PROGRAM:
        path = Path(__file__).with_name("program.py")
        spec = importlib.util.spec_from_file_location("sortcost_program", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        if not callable(getattr(module, "sort", None)):
            raise TypeError("the program defines no sort(items, less)")
        _PROGRAM.append(module)
    return _PROGRAM[0]


def solve(instance: dict[str, Any], llm: Any) -> dict[str, Any]:
    keys = list(instance["keys"])
    items = [Item() for _ in keys]
    position = {id(item): i for i, item in enumerate(items)}
    count = 0

    def index(item: object) -> int:
        i = position.get(id(item), -1)
        if i < 0 or items[i] is not item:
            raise TypeError(f"{item!r} is not one of the items to sort")
        return i

    def less(a: object, b: object) -> bool:
        nonlocal count
        count += 1
        return bool(keys[index(a)] < keys[index(b)])

    given = list(items)
    result = _program().sort(given, less)
    if result is None:  # sorted in place
        result = given
    if not isinstance(result, list | tuple):
        raise TypeError(f"sort returned a {type(result).__name__}, not a list of the items")
    return {"order": [index(item) for item in result], "comparisons": count}
